"""The shipped Databricks bundle: valid by the vendor's own SDK and by the bundle CLI's published
schema and mode rules, running the ``main`` entry point with exactly the arguments MLproject
declares, in an environment of its own lock on the node's local disk.

Sources of the rules enforced here (docs/databricks.md has the evidence behind the choices):

- the bundle schema: ``bundle/schema/jsonschema.json`` of github.com/databricks/cli at
  7bbe2852131bc5c4a6c7bad5f147bc7772eedf9f (v1.13.0), rewritten as
  tests/data/databricks_bundle/bundle.schema.json (its README says what it covers);
- the mode rules: "Databricks Asset Bundle deployment modes"
  (https://docs.databricks.com/aws/en/dev-tools/bundles/deployment-modes) and the CLI code that
  enforces them, ``bundle/config/mutator/resourcemutator/validate_target_mode.go`` and
  ``run_as.go`` at the same commit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_packager.config.databricks_bundle import (
    DATABRICKS_BUNDLE,
    GPU_JOB,
    GPU_NODE_TYPES,
    JOB,
    LOCAL_DISK,
    NODE_TYPES,
)
from llm_packager.config.parameters import fields_of
from llm_packager.config.specs import MainParameters
from llm_packager.keys import MODEL_NAME_TAG
from llm_packager.project import PROJECT_DIR
from tests.support import copy_tracking_store, project_environment, run_step

MAIN_FLAGS = [f"--{field.name.replace('_', '-')}" for field in fields_of(MainParameters)]


def _bundle() -> dict:
    return yaml.safe_load((PROJECT_DIR / DATABRICKS_BUNDLE).read_text())


def _job() -> dict:
    return _bundle()["resources"]["jobs"][JOB]


def _gpu_job(target: str = "gpu") -> dict:
    return _bundle()["targets"][target]["resources"]["jobs"][GPU_JOB]


def _task_arguments(job: dict | None = None) -> list[str]:
    (task,) = (job or _job())["tasks"]
    return task["spark_python_task"]["parameters"]


def _main_arguments(job: dict | None = None) -> list[str]:
    """The task's arguments from the entry point on (run_step.py's own options come first)."""
    arguments = _task_arguments(job)
    return arguments[arguments.index("main") :]


def test_the_databricks_job_is_one_task_that_runs_main_with_its_mlproject_flags():
    arguments = _main_arguments()
    assert arguments[0] == "main"
    assert [argument for argument in arguments if argument.startswith("--")] == MAIN_FLAGS
    assert arguments[arguments.index("--env-manager") + 1] == "local"


def test_databricks_registers_to_unity_catalog_with_a_three_level_name():
    arguments = _main_arguments()
    overrides = arguments[arguments.index("--overrides") + 1]
    assert overrides == (
        "register=unity-catalog "
        "register.registered_model_name=${var.catalog}.${var.schema}.${var.registered_model}"
    )
    variables = _bundle()["variables"]
    assert {"catalog", "schema", "model"} <= set(variables)
    assert variables["registered_model"]["default"] == "phi3_mini_4k_instruct_chat"
    assert arguments[arguments.index("--model") + 1] == "${var.model}"


def test_the_bundle_jobs_validate_with_databricks_bundles():
    from databricks.bundles.jobs import Job

    for job in (_job(), _gpu_job()):
        assert [task.task_key for task in Job.from_dict(job).tasks] == ["main"]


def test_the_bundle_job_refuses_a_misspelt_field_so_the_check_can_fail():
    from databricks.bundles.jobs import Job

    broken = _job()
    broken["tasks"][0]["spark_python_taks"] = broken["tasks"][0].pop("spark_python_task")
    with pytest.raises(ValueError, match="Unexpected field 'spark_python_taks'"):
        Job.from_dict(broken)


def test_the_bundle_uses_only_variables_it_declares():
    text = (PROJECT_DIR / DATABRICKS_BUNDLE).read_text()
    declared = set(_bundle()["variables"])
    used = {part.split("}")[0] for part in text.split("${var.")[1:]}
    assert used <= declared


def test_no_task_parameter_or_environment_value_is_empty():
    # The Terraform deployment engine panics on "" in a task parameter
    # (terraform-provider-databricks#2154); nothing generated may be empty.
    def strings(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    assert "" not in list(strings(_bundle()))
    assert all(_task_arguments())


def test_the_job_runs_on_a_runtime_without_its_own_torch_and_logs_to_the_workspace():
    cluster = _job()["job_clusters"][0]["new_cluster"]
    # DBR 15.4 LTS standard: Python 3.11 as the lock (16.4 and 17.3 have 3.12), and no
    # preinstalled torch or torchvision (the ML runtime's torchvision is built for its torch, and
    # transformers imports torchvision whenever it is installed).
    assert "-ml-" not in cluster["spark_version"] and cluster["spark_version"].startswith("15.4")
    # Our lock goes into an environment of its own, never over the runtime's numpy 1 (numpy 2 in
    # the runtime's environment stopped 15.4's REPL: dask-contrib/dask-databricks#41), so the job
    # installs no cluster library.
    (task,) = _job()["tasks"]
    assert "libraries" not in task
    assert _task_arguments()[:2] == ["--lock", "requirements.txt"]
    assert cluster["spark_env_vars"]["MLFLOW_TRACKING_URI"] == "databricks"
    # No secret scope the user may not have: a Hub token is optional (README).
    assert "secrets/" not in (PROJECT_DIR / DATABRICKS_BUNDLE).read_text()


def test_the_bundle_deploys_with_the_direct_engine_from_the_cli_version_that_has_it():
    # bundle.engine arrived in CLI v0.295.0; the direct engine is GA from v1.3.0 (CLI CHANGELOG).
    bundle = _bundle()["bundle"]
    assert bundle["engine"] == "direct"
    assert bundle["databricks_cli_version"] == ">= 1.3.0"


@pytest.mark.slow
def test_the_databricks_task_script_runs_an_entry_point_module(tmp_path, empty_tracking_store):
    import mlflow

    # The store the step's process would otherwise make (seconds of migrations), made already.
    tracking_uri = copy_tracking_store(empty_tracking_store, tmp_path)
    completed = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "databricks" / "run_step.py"), "fetch_model",
         "--name", "tiny", "--source", "synthetic", "--vocab-size", "1024",
         "--hidden-size", "64", "--intermediate-size", "128", "--num-hidden-layers", "2",
         "--num-attention-heads", "4", "--num-key-value-heads", "4",
         "--max-position-embeddings", "512"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=project_environment(MLFLOW_TRACKING_URI=tracking_uri),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    run = mlflow.MlflowClient(tracking_uri).search_runs(["0"])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[MODEL_NAME_TAG] == "tiny"


def test_the_databricks_task_script_refuses_an_unknown_entry_point():
    completed = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "databricks" / "run_step.py"), "fetch_modle"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 1
    assert "the entry point names steps/*.py" in completed.stderr


def test_main_reads_overrides_none_as_no_overrides(tmp_path):
    # The Azure ML job passes "none" (the service refuses empty inputs); an unknown step is
    # reported only after the config composed, so "none" must have been accepted.
    completed = run_step(
        "main", "--model", "tiny-random-phi3", "--overrides", "none", "--steps", "bogus",
        timeout=120, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    assert completed.returncode == 2
    assert "error: steps: unknown step 'bogus'" in completed.stderr


# --- the bundle CLI's schema -------------------------------------------------------------------

SCHEMA = PROJECT_DIR / "tests" / "data" / "databricks_bundle" / "bundle.schema.json"


def _schema_errors(document: dict, schema: dict) -> list[str]:
    """Every place ``document`` breaks ``schema``. The CLI's patterns use \\p{L} (Go's regexp),
    which Python's re lacks, so patterns are matched with the ``regex`` package."""
    import regex
    from jsonschema import ValidationError, validators

    base = validators.validator_for(schema)

    def pattern(validator, expected, instance, _schema):
        if validator.is_type(instance, "string") and not regex.search(expected, instance):
            yield ValidationError(f"{instance!r} does not match {expected!r}")

    validator = validators.extend(base, {"pattern": pattern})(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def _our_schema() -> dict:
    return json.loads(SCHEMA.read_text())


def test_the_bundle_matches_the_cli_schema_outside_its_jobs():
    assert _schema_errors(_bundle(), _our_schema()) == []


@pytest.mark.parametrize(
    "plant",
    [
        lambda bundle: bundle["bundle"].update(engine="terraformm"),
        lambda bundle: bundle["targets"]["prod"].update(run_ass={"user_name": "x"}),
        lambda bundle: bundle["targets"]["prod"]["workspace"].update(roots_path="/x"),
        lambda bundle: bundle["variables"]["model"].update(defualt="x"),
        lambda bundle: bundle.update(varaibles={}),
    ],
    ids=["engine", "target-field", "workspace-field", "variable-field", "top-level-field"],
)
def test_a_planted_bad_field_fails_the_schema(plant):
    bundle = _bundle()
    plant(bundle)
    assert _schema_errors(bundle, _our_schema()) != []


def test_the_bundle_matches_the_published_cli_schema_when_a_copy_is_given():
    # The CLI's whole schema (`databricks bundle schema`) is not stored here; see
    # tests/data/databricks_bundle/README.md.
    path = os.environ.get("DATABRICKS_BUNDLE_SCHEMA")
    if not path:
        pytest.skip("DATABRICKS_BUNDLE_SCHEMA names no copy of the CLI's published schema")
    published = json.loads(Path(path).read_text())
    assert _schema_errors(_bundle(), published) == []
    broken = _bundle()
    broken["resources"]["jobs"][JOB]["tasks"][0]["spark_python_taks"] = {}
    assert _schema_errors(broken, published) != []


# --- the documented mode rules -----------------------------------------------------------------


def _resolved_run_as(bundle: dict, run_as: object) -> object:
    if isinstance(run_as, str) and run_as.startswith("${var."):
        return bundle["variables"][run_as[len("${var.") : -1]]["default"]
    return run_as


def mode_problems(bundle: dict, target_name: str) -> list[str]:
    """What ``databricks bundle validate -t <target>`` refuses for the target's mode, as the CLI
    does it (validate_target_mode.go, run_as.go): a mode other than development or production;
    in production a target without an explicit ``workspace.root_path`` (the CLI only recommends
    it when run_as or a service principal is used; we require it) and a ``run_as`` without
    exactly one identity; in development workspace paths or a name prefix without the user's
    name, or triggers unpaused by default."""
    target = bundle["targets"][target_name]
    mode = target.get("mode", "")
    problems = []
    if mode not in ("development", "production", ""):
        problems.append(f"unsupported value '{mode}' specified for 'mode'")
    workspace = target.get("workspace", {})
    if mode == "production":
        if not workspace.get("root_path"):
            problems.append("target with 'mode: production' must set 'workspace.root_path'")
        run_as = _resolved_run_as(bundle, target.get("run_as", bundle.get("run_as")))
        identities = [
            key for key in ("user_name", "service_principal_name") if key in (run_as or {})
        ]
        if len(identities) != 1:
            problems.append("run_as section must specify exactly one identity")
    if mode == "development":
        user = "${workspace.current_user.short_name}"
        for key, path in workspace.items():
            if key.endswith("_path") and not (path.startswith("~/") or user in path):
                problems.append(f"{key} must start with '~/' or contain the current username")
        presets = target.get("presets", {})
        if presets.get("trigger_pause_status") == "UNPAUSED":
            problems.append("development cannot set trigger pause status to UNPAUSED")
        if "name_prefix" in presets and user not in presets["name_prefix"]:
            problems.append("prefix should contain the current username")
    return problems


def test_every_target_follows_its_mode_rules_and_prod_runs_as_one_identity():
    bundle = _bundle()
    assert {name: mode_problems(bundle, name) for name in bundle["targets"]} == {
        name: [] for name in bundle["targets"]
    }
    production = [name for name, t in bundle["targets"].items() if t["mode"] == "production"]
    assert production == ["prod", "prod-azure", "prod-gcp"]


@pytest.mark.parametrize(
    ("target", "plant", "refusal"),
    [
        ("prod", lambda t: t.pop("workspace"), "must set 'workspace.root_path'"),
        ("prod", lambda t: t.update(run_as={"user_name": "a", "service_principal_name": "b"}),
         "exactly one identity"),
        ("prod", lambda t: t.update(mode="prodution"), "unsupported value"),
        ("dev", lambda t: t.update(workspace={"root_path": "/Shared/x"}), "root_path must start"),
        ("dev", lambda t: t.update(presets={"name_prefix": "[dev] "}), "prefix should contain"),
    ],
    ids=["prod-root-path", "prod-two-identities", "misspelt-mode", "dev-shared-path", "dev-prefix"],
)  # fmt: skip
def test_a_planted_mode_mistake_is_refused(target, plant, refusal):
    bundle = _bundle()
    plant(bundle["targets"][target])
    assert any(refusal in problem for problem in mode_problems(bundle, target))


# --- nodes per cloud, caches on the local disk, the GPU target ---------------------------------


def _node_of(target: str, variable: str = "node_type_id") -> str:
    bundle = _bundle()
    return (
        bundle["targets"][target]
        .get("variables", {})
        .get(variable, bundle["variables"][variable]["default"])
    )


def test_each_cloud_has_dev_and_prod_targets_on_its_own_32_gib_node():
    for cloud, node in NODE_TYPES.items():
        suffix = "" if cloud == "aws" else f"-{cloud}"
        assert _node_of(f"dev{suffix}") == node
        assert _node_of(f"prod{suffix}") == node
    # GCP nodes get a local SSD only when asked for one.
    gcp = _bundle()["targets"]["dev-gcp"]["resources"]["jobs"][JOB]["job_clusters"][0]
    assert gcp["new_cluster"]["gcp_attributes"]["local_ssd_count"] == 1


def test_every_cache_the_code_uses_is_on_the_nodes_local_disk():
    from llm_packager.sources import upstream

    for job in (_job(), _gpu_job()):
        variables = job["job_clusters"][0]["new_cluster"]["spark_env_vars"]
        cache_variables = ["HF_HOME", "PIP_CACHE_DIR", upstream._CACHE_ENV, "LLM_PACKAGER_VENVS"]
        assert all(variables[name].startswith("/local_disk0/") for name in cache_variables)
        assert LOCAL_DISK.startswith("/local_disk0/")


def test_the_gpu_targets_run_the_cuda_build_on_a_gpu_node_per_cloud():
    from databricks.bundles.jobs import Job

    for cloud, node in GPU_NODE_TYPES.items():
        target = "gpu" if cloud == "aws" else f"gpu-{cloud}"
        job = _gpu_job(target)
        Job.from_dict(job)
        assert "-gpu-ml-" in job["job_clusters"][0]["new_cluster"]["spark_version"]
        assert _node_of(target, "gpu_node_type_id") == node
        arguments = _task_arguments(job)
        assert arguments[arguments.index("main") - 4 : arguments.index("main") - 2] == [
            "requirements.txt",
            "--cuda",
        ]
        overrides = arguments[arguments.index("--overrides") + 1]
        assert overrides.startswith("onnx=prebuilt-cuda transformers=cuda ")


def _run_step_module():
    spec = importlib.util.spec_from_file_location(
        "run_step", PROJECT_DIR / "databricks" / "run_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cuda_swap_removes_what_requirements_cuda_says_to_remove():
    text = (PROJECT_DIR / "requirements-cuda.txt").read_text()
    (line,) = [line for line in text.splitlines() if "pip uninstall -y" in line]
    assert tuple(line.split("pip uninstall -y", 1)[1].split()) == _run_step_module().CUDA_REPLACES


# --- run_step.py's own environment -------------------------------------------------------------


def _run_in_environment(tmp_path, lock_text: str, *extra_env: tuple[str, str]):
    lock = tmp_path / "lock.txt"
    lock.write_text(lock_text)
    venvs = tmp_path / "venvs"
    # PIP_NO_INDEX: nothing here may reach a package index.
    env = project_environment(LLM_PACKAGER_VENVS=str(venvs), PIP_NO_INDEX="1", **dict(extra_env))
    completed = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "databricks" / "run_step.py"),
         "--lock", str(lock), "fetch_model", "--help"],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    return completed, venvs


@pytest.mark.slow  # makes virtual environments: 20-50 s on two cores
def test_the_task_runs_in_an_environment_of_its_lock_made_once(tmp_path):
    # An empty lock: the environment holds none of the project's packages, so the step fails to
    # import there, which shows it ran in that environment and not in this test's.
    completed, venvs = _run_in_environment(tmp_path, "# nothing\n")
    assert completed.returncode != 0
    assert "No module named" in completed.stderr
    (environment,) = venvs.iterdir()
    mark = environment / _run_step_module().COMPLETE_MARK
    made = mark.stat().st_mtime_ns
    again, _ = _run_in_environment(tmp_path, "# nothing\n")
    assert "No module named" in again.stderr
    assert mark.stat().st_mtime_ns == made  # reused, not made again


@pytest.mark.slow  # makes virtual environments: 20-50 s on two cores
def test_a_failed_install_leaves_no_environment_marked_whole_and_a_half_one_is_remade(tmp_path):
    completed, venvs = _run_in_environment(tmp_path, "no-such-package-anywhere==1.0\n")
    assert completed.returncode == 1
    assert "making the task's environment failed" in completed.stderr
    (environment,) = venvs.iterdir()
    mark_name = _run_step_module().COMPLETE_MARK
    assert not (environment / mark_name).exists()
    # The same lock again: the half-made environment is not used but made anew (and fails
    # again here, for the same missing package).
    (environment / "left-over").write_text("from the cut-short install")
    _run_in_environment(tmp_path, "no-such-package-anywhere==1.0\n")
    assert not (environment / "left-over").exists()


class _RuntimeConfig:
    """databricks-sdk's Config as a Databricks runtime gives it: the workspace host, and a bearer
    header from the runtime's own context (databricks.sdk.core.Config.authenticate)."""

    host = "https://adb-1234.5.azuredatabricks.net"

    def authenticate(self) -> dict[str, str]:
        return {"Authorization": "Bearer runtime-token"}


def test_mlflow_in_the_tasks_environment_gets_the_runtimes_workspace_credentials(
    monkeypatch, capsys
):
    import databricks.sdk.core

    monkeypatch.setattr(databricks.sdk.core, "Config", _RuntimeConfig)
    workspace_credentials = _run_step_module().workspace_credentials
    assert workspace_credentials({}) == {
        "DATABRICKS_HOST": _RuntimeConfig.host,
        "DATABRICKS_TOKEN": "runtime-token",
    }
    # A job that sets its own host keeps it; a runtime without credentials changes nothing.
    assert workspace_credentials({"DATABRICKS_HOST": "https://mine"}) == {}

    class NoCredentials(_RuntimeConfig):
        def authenticate(self) -> dict[str, str]:
            raise ValueError("default auth: cannot configure default credentials")

    monkeypatch.setattr(databricks.sdk.core, "Config", NoCredentials)
    assert workspace_credentials({}) == {}
    assert "runtime-token" not in capsys.readouterr().err


def test_the_steps_main_starts_run_the_task_environments_python(tmp_path, monkeypatch):
    """main starts each step as MLproject's shell command `python -m steps.<step>`: the `python`
    found first on PATH must be the task environment's, not the runtime's."""
    module = _run_step_module()
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    runtime_bin = tmp_path / "runtime" / "bin"
    runtime_bin.mkdir(parents=True)
    (runtime_bin / "python").write_text("#!/bin/sh\n")
    (runtime_bin / "python").chmod(0o755)
    monkeypatch.setattr(module, "ensure_environment", lambda *arguments: python)
    monkeypatch.setattr(module, "workspace_credentials", lambda environment: {})
    started = {}

    def execve(path, arguments, environment):
        started.update(path=path, environment=environment)
        raise SystemExit(0)

    monkeypatch.setattr(module.os, "execve", execve)
    monkeypatch.setattr(module.os, "execv", lambda *arguments: pytest.fail("PATH left as it was"))
    monkeypatch.setenv("PATH", str(runtime_bin))
    monkeypatch.setattr(module.sys, "argv", ["run_step.py", "--lock", "requirements.txt", "main"])
    with pytest.raises(SystemExit):
        module.main()
    assert started["path"] == python
    assert shutil.which("python", path=started["environment"]["PATH"]) == str(python)
    assert started["environment"]["VIRTUAL_ENV"] == str(python.parent.parent)

"""Azure ML: a tracking server without MLflow 3's LoggedModel API, and the lock azureml-mlflow
admits. The server is a real `mlflow server` behind a loopback proxy that answers 404 to
`/api/2.0/mlflow/logged-models*`, as Azure ML's does."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT
from packaging.requirements import Requirement

from llm_packager.choices import LoggedModels, ModelStore
from llm_packager.keys import (
    HOST_TAG,
    LOGGING_MODEL_TAG,
    MODEL_ARTIFACT_PATH,
    MODEL_STORE_TAG,
    MODEL_URI_TAG,
    OUTPUTS_TAG,
    PID_TAG,
    REUSE_KEY_TAG,
    STEPS_REUSED_TAG,
    VALIDATION_STATUS_TAG,
    alias_tag_key,
    run_verdict_key,
)
from llm_packager.models.model_store import has_status, resolve_model_store, runs_left_logging
from llm_packager.models.registry import (
    alias_model_uri,
    aliases_unsupported,
    remove_alias,
    set_alias,
    version_by_alias,
)
from llm_packager.pipeline.azureml_launcher import FETCHER_VARIABLE
from llm_packager.pipeline.reuse import find_reusable_run
from llm_packager.pipeline.step_run import fail_orphaned_runs
from llm_packager.project import PROJECT_DIR
from tests.azureml_double import ALIAS_PATH, RUNS_SEARCH_PATH, azureml_double, filters_on_status
from tests.loopback_proxy import LOGGED_MODELS_PREFIX, reverse_proxy
from tests.pipeline.test_azureml_launcher import FAKE_FETCHER
from tests.support import (
    TrackingServer,
    mlflow_run_main,
    project_environment,
    runs_of,
    tracking_uri,
)

AZURE_LOCK = PROJECT_DIR / "requirements-azureml.txt"
STEPS = ("model=tiny-random-phi3", "overrides=evaluate.limit=4")


def _lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_auto_finds_logged_models_where_the_server_has_them(local_tracking):
    experiment = local_tracking.create_experiment("probe")
    assert resolve_model_store(LoggedModels.auto, local_tracking, experiment) == (
        ModelStore.logged_models
    )
    assert resolve_model_store(LoggedModels.off, local_tracking, experiment) == (
        ModelStore.run_artifacts
    )


def test_auto_finds_none_behind_a_server_that_answers_404(tracking_server: TrackingServer):
    with reverse_proxy(tracking_server.uri) as (uri, seen):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("probe-404")
        assert resolve_model_store(LoggedModels.auto, client, experiment) == (
            ModelStore.run_artifacts
        )
    assert any(LOGGED_MODELS_PREFIX in line for line in seen)


def test_the_azure_lock_admits_azureml_mlflow_and_pins_everything_it_requires(tmp_path):
    pins = _lock_pins(AZURE_LOCK)
    wanted = f"azureml-mlflow=={pins['azureml-mlflow']}"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp_path), wanted],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("azureml_mlflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("/METADATA")))
    requirements = [
        Requirement(line.split(":", 1)[1].strip())
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    needed = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert any(r.name == "mlflow-skinny" for r in needed)
    for requirement in needed:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement} is not pinned in {AZURE_LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{AZURE_LOCK.name} pins {name}=={pins[name]}, but azureml-mlflow needs {requirement}"
        )
    # The same MLflow runs the whole pipeline: mlflow, skinny and tracing move together.
    assert pins["mlflow"] == pins["mlflow-skinny"] == pins["mlflow-tracing"]


def _check_artifact_mode_pipeline(client: MlflowClient, experiment: str, name: str) -> None:
    (main_run,) = runs_of(client, experiment, "main")
    assert main_run.data.tags[MODEL_STORE_TAG] == "run_artifacts"
    for step in ("log_transformers", "log_onnx"):
        (logged,) = runs_of(client, experiment, step)
        assert logged.data.tags[MODEL_STORE_TAG] == "run_artifacts"
        assert logged.data.tags[MODEL_URI_TAG] == (
            f"runs:/{logged.info.run_id}/{MODEL_ARTIFACT_PATH}"
        )
        assert logged.data.tags[run_verdict_key(VALIDATION_STATUS_TAG)] == "passed"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.status == "READY"
    assert champion.tags[VALIDATION_STATUS_TAG] == "passed"
    assert champion.run_id in {run.info.run_id for run in runs_of(client, experiment, "log_onnx")
                               + runs_of(client, experiment, "log_transformers")}  # fmt: skip


@pytest.mark.slow
def test_the_whole_pipeline_runs_without_the_logged_model_api(tracking_server, tmp_path):
    experiment, name = "no-logged-models", "no-logged-models-chat"
    with reverse_proxy(tracking_server.uri) as (uri, seen):
        env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}
        overrides = f"{STEPS[1]} register.registered_model_name={name}"
        completed = mlflow_run_main(tmp_path, STEPS[0], overrides, **env)
        assert completed.returncode == 0, completed.stderr[-4000:]
        client = MlflowClient(tracking_uri=uri)
        _check_artifact_mode_pipeline(client, experiment, name)
        versions = len(client.search_model_versions(f"name = '{name}'"))

        # A rerun reuses every step, and registers no second version of the same model.
        completed = mlflow_run_main(tmp_path, STEPS[0], overrides, **env)
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert runs_of(client, experiment, "main")[0].data.tags[STEPS_REUSED_TAG] == (
            "fetch_model,log_transformers,log_onnx,evaluate,register"
        )
        assert len(client.search_model_versions(f"name = '{name}'")) == versions

        with tracking_uri(uri):
            answer = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            )
        assert answer[0]["object"] == "chat.completion"
    # The server did refuse the API: the probe asked, and so did MLflow's own downloads of run
    # artifacts (which look for a LoggedModel of the same name and go on without one).
    refused = [line for line in seen if LOGGED_MODELS_PREFIX in line]
    assert refused and all(line.startswith("POST /api/2.0/mlflow/logged-models/search")
                           for line in refused), refused  # fmt: skip


def _azure_venv() -> Path:
    """A virtual environment built from requirements-azureml.txt, kept while the lock is the
    same (the lock's hash names it)."""
    digest = hashlib.sha256(AZURE_LOCK.read_bytes()).hexdigest()[:16]
    venv = Path.home() / ".cache" / "llm_packager" / f"venv-azureml-{digest}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-r", str(AZURE_LOCK)],
            check=True, timeout=1800,
        )  # fmt: skip
        (venv / ".complete").write_text("ok\n")
    return venv


# ----- The Azure ML double (tests/azureml_double.py): status filters and aliases -----


def test_the_double_refuses_a_status_filter_as_azure_does_not_support_it(tracking_server):
    with azureml_double(tracking_server.uri) as workspace:
        client = MlflowClient(tracking_uri=workspace.uri)
        experiment = client.create_experiment(f"status-filter-{uuid.uuid4().hex[:8]}")
        # The filter the reuse search sent before this fix: refused here, so it can fail.
        with pytest.raises(MlflowException, match="INVALID_PARAMETER_VALUE"):
            client.search_runs([experiment], "tags.`x` = 'y' and attributes.status = 'FINISHED'")
        assert client.search_runs([experiment], "tags.`registration_status` = 'x'") == []


def _ended_run(client, experiment: str, status: str, **tags: str) -> str:
    run_id = client.create_run(experiment, tags=tags).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def test_the_reuse_search_finds_a_finished_run_without_a_status_filter(tracking_server, tmp_path):
    with azureml_double(tracking_server.uri) as workspace:
        client = MlflowClient(tracking_uri=workspace.uri)
        experiment = client.create_experiment(f"reuse-{uuid.uuid4().hex[:8]}")
        outputs = json.dumps({"decision": f"models:/{uuid.uuid4().hex}"})
        failed = _ended_run(client, experiment, "FAILED", **{REUSE_KEY_TAG: "k"})
        assert find_reusable_run(client, experiment, "k") is None
        finished = _ended_run(client, experiment, "FINISHED", **{REUSE_KEY_TAG: "k"})
        # Outputs checked on the finished run only: it announced none yet, so none is reusable.
        assert find_reusable_run(client, experiment, "k") is None
        log = tmp_path / "output.txt"
        log.write_text("x")
        client.log_artifact(finished, str(log))
        announced = {"file": f"runs:/{finished}/{log.name}"}
        client.set_tag(finished, OUTPUTS_TAG, json.dumps(announced))
        client.set_tag(failed, OUTPUTS_TAG, outputs)
        assert find_reusable_run(client, experiment, "k").info.run_id == finished
        assert not any(filters_on_status(_filter(r)) for r in workspace.received)


def _filter(request) -> str:
    if not request.path.startswith(RUNS_SEARCH_PATH):
        return ""
    return json.loads(request.body or b"{}").get("filter", "")


def test_orphaned_runs_are_found_without_a_status_filter(tracking_server):
    with azureml_double(tracking_server.uri) as workspace:
        client = MlflowClient(tracking_uri=workspace.uri)
        experiment = client.create_experiment(f"orphans-{uuid.uuid4().hex[:8]}")
        here = {HOST_TAG: socket.gethostname(), PID_TAG: "999999999"}
        orphan = _ended_run(client, experiment, "RUNNING", **here)
        ended = _ended_run(client, experiment, "FINISHED", **here)
        alive = _ended_run(client, experiment, "RUNNING", **{**here, PID_TAG: str(os.getpid())})
        assert fail_orphaned_runs(client, experiment) == [orphan]
        assert client.get_run(orphan).info.status == "FAILED"
        assert client.get_run(ended).info.status == "FINISHED"
        assert client.get_run(alive).info.status == "RUNNING"


def test_runs_left_logging_are_the_ended_ones_whatever_the_status_casing(tracking_server):
    with azureml_double(tracking_server.uri) as workspace:
        client = MlflowClient(tracking_uri=workspace.uri)
        experiment = client.create_experiment(f"abandoned-{uuid.uuid4().hex[:8]}")
        marked = {LOGGING_MODEL_TAG: "true"}
        killed = _ended_run(client, experiment, "FAILED", **marked)
        _ended_run(client, experiment, "RUNNING", **marked)
        assert [r.info.run_id for r in runs_left_logging(client, experiment)] == [killed]
        # No LoggedModel API here: the model store is run artifacts, and the cleanup of
        # LoggedModels is never asked for; the marked runs are still found by tag alone.
        assert resolve_model_store(LoggedModels.auto, client, experiment) == (
            ModelStore.run_artifacts
        )


def test_status_compares_in_any_casing():
    class Info:
        status = "Running"

    class Run:
        info = Info()

    assert has_status(Run(), "RUNNING") and not has_status(Run(), "FINISHED")


def _versions_with_a_model(client, name: str, count: int, tmp_path: Path) -> list[str]:
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    folder = tmp_path / "echo"
    mlflow.pyfunc.save_model(str(folder), python_model=Echo())
    client.create_registered_model(name)
    experiment = client.create_experiment(name)
    versions = []
    for _ in range(count):
        run_id = client.create_run(experiment).info.run_id
        client.log_artifacts(run_id, str(folder), "echo")
        source = f"runs:/{run_id}/echo"
        versions.append(client.create_model_version(name, source, run_id).version)
    return versions


def test_without_registry_aliases_a_version_tag_moves_as_the_alias_would(tracking_server, tmp_path):
    with azureml_double(tracking_server.uri) as workspace:
        client = MlflowClient(tracking_uri=workspace.uri, registry_uri=workspace.uri)
        name = f"no-aliases-{uuid.uuid4().hex[:8]}"
        first, second = _versions_with_a_model(client, name, 2, tmp_path)
        # The registry refuses aliases as an endpoint it lacks: the fallback is told by that.
        with pytest.raises(MlflowException) as refused:
            client.set_registered_model_alias(name, "champion", first)
        assert aliases_unsupported(refused.value)
        assert set_alias(client, name, "champion", first) is False
        assert alias_model_uri(client, name, "champion") == f"models:/{name}/{first}"
        assert set_alias(client, name, "champion", second) is False
        key = alias_tag_key("champion")
        assert key not in client.get_model_version(name, first).tags
        assert alias_model_uri(client, name, "champion") == f"models:/{name}/{second}"
        with tracking_uri(workspace.uri):
            assert mlflow.pyfunc.load_model(alias_model_uri(client, name, "champion"))
        remove_alias(client, name, "champion")
        assert version_by_alias(client, name, "champion") is None


def test_with_registry_aliases_the_registry_alias_is_used(tracking_server, tmp_path):
    with azureml_double(tracking_server.uri, aliases=True) as workspace:
        client = MlflowClient(tracking_uri=workspace.uri, registry_uri=workspace.uri)
        name = f"aliases-{uuid.uuid4().hex[:8]}"
        (first,) = _versions_with_a_model(client, name, 1, tmp_path)
        assert set_alias(client, name, "champion", first) is True
        assert client.get_model_version_by_alias(name, "champion").version == first
        assert alias_tag_key("champion") not in client.get_model_version(name, first).tags
        assert alias_model_uri(client, name, "champion") == f"models:/{name}/{first}"


# ----- The jobs as Azure ML runs them, through the double -----


def _job_command(path: Path, **inputs: str) -> str:
    """The job's command with its inputs filled in, as Azure ML does before running it in a
    shell: the job file's own defaults, then ``inputs``."""
    document = yaml.safe_load(path.read_text())
    values = {**document["inputs"], **inputs}
    return re.sub(r"\$\{\{inputs\.(\w+)\}\}", lambda m: str(values[m.group(1)]),
                  document["command"])  # fmt: skip


def _job_snapshot(folder: Path) -> Path:
    """What ``az ml job create`` uploads as the job's code (``code: ..``): the project's files
    that git does not ignore, copied once, so a second job runs the very same code even while the
    working tree changes (the reuse key holds the code version)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_DIR, capture_output=True,
        text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    for name in listed:
        if (PROJECT_DIR / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_DIR / name, folder / name)
    return folder


def _run_job(
    command: str, environment: dict[str, str], code: Path = PROJECT_DIR, venv: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # The job runs in its code folder (code: ..), the project's root; given ``venv``, with that
    # environment's interpreter and scripts first on the PATH, as Azure ML's image has them.
    environment = project_environment(**environment)
    if venv is not None:
        environment["PATH"] = f"{venv / 'bin'}{os.pathsep}{environment['PATH']}"
        environment.pop("VIRTUAL_ENV", None)
    return subprocess.run(["bash", "-c", command], cwd=code, env=environment,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip


def _nested_steps(client: MlflowClient, experiment_id: str, parent: str) -> list:
    return client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")


@pytest.mark.slow
def test_the_workspace_job_on_the_azure_ml_lock_adopts_its_run_and_passes_cold_and_warm(
    tracking_server, tmp_path
):
    # The combination Azure ML deploys: the Azure lock's MLflow with azureml-mlflow, the workspace
    # job's own command, and a server that refuses what Azure's refuses (no LoggedModel API, no
    # aliases, no status filters, no request without the workspace token, the job's run handed
    # in). Run twice, as a team reruns a job: cold, then warm.
    venv = _azure_venv()
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlflow; print(mlflow.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version == _lock_pins(AZURE_LOCK)["mlflow"]
    experiment, name = f"azure-job-{uuid.uuid4().hex[:8]}", f"azure-job-{uuid.uuid4().hex[:8]}"
    overrides = f"evaluate.limit=4 register.registered_model_name={name}"
    command = _job_command(PROJECT_DIR / "azureml" / "job.yml", model="tiny-random-phi3",
                           overrides=overrides)  # fmt: skip
    code = _job_snapshot(tmp_path / "code")
    with azureml_double(tracking_server.uri, token="generate") as workspace:
        client = MlflowClient(tracking_uri=tracking_server.uri)
        registered = 0
        for warm in (False, True):
            job = workspace.start_job(experiment)
            completed = _run_job(command, job.environment(), code, venv)
            job.end(completed.returncode)
            assert completed.returncode == 0, completed.stderr[-4000:]
            # main is the job's own run: the steps are nested under the handed-in run id.
            main_run = client.get_run(job.run_id)
            assert main_run.data.tags[MODEL_STORE_TAG] == "run_artifacts"
            steps = _nested_steps(client, job.experiment_id, job.run_id)
            reused = main_run.data.tags[STEPS_REUSED_TAG]
            versions = client.search_model_versions(f"name = '{name}'")
            if warm:
                assert reused == "fetch_model,log_transformers,log_onnx,evaluate,register"
                assert steps == []
                # The rerun registered nothing new.
                assert len(versions) == registered
            else:
                registered = len(versions)
                assert reused == ""
                entry_points = {run.data.tags[MLFLOW_PROJECT_ENTRY_POINT] for run in steps}
                assert entry_points == {"fetch_model", "log_transformers", "log_onnx",
                                        "evaluate", "register"}  # fmt: skip
                for logged in (
                    r for r in steps if r.data.tags[MLFLOW_PROJECT_ENTRY_POINT].startswith("log_")
                ):
                    assert logged.data.tags[MODEL_URI_TAG] == (
                        f"runs:/{logged.info.run_id}/{MODEL_ARTIFACT_PATH}"
                    )  # fmt: skip
                # Every step run ran in the job's experiment, and nothing ran outside the job.
                outside = client.search_runs([job.experiment_id], "")
                assert {run.info.run_id for run in outside} == {
                    job.run_id,
                    *(run.info.run_id for run in steps),
                }
        # Every request carried the workspace token (the double refuses any other with 401).
        assert workspace.received and len(workspace.requests_with_token(workspace.token)) == len(
            workspace.received
        )
        # No alias endpoint here: the champion is the version tagged for it, and it loads and
        # answers on the Azure lock's MLflow, as a deployment there would load it.
        registry = MlflowClient(tracking_uri=workspace.uri, registry_uri=workspace.uri)
        os.environ["MLFLOW_TRACKING_TOKEN"] = workspace.token
        try:
            uri = alias_model_uri(registry, name, "champion")
        finally:
            del os.environ["MLFLOW_TRACKING_TOKEN"]
        environment = project_environment(**job.environment())
        answered = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import json, sys, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
             "print(json.dumps(m.predict({'messages': [{'role': 'user', 'content': 'hi'}], "
             "'max_tokens': 3})))", uri],
            env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert answered.returncode == 0, answered.stderr[-3000:]
        answer = json.loads(answered.stdout.strip().splitlines()[-1])
        assert answer[0]["object"] == "chat.completion"
        # Each alias is on one version, the champion's and the challenger's apart.
        holders = {alias: [v.version for v in versions if alias_tag_key(alias) in v.tags]
                   for alias in ("champion", "challenger")}  # fmt: skip
        assert len(holders["champion"]) == 1 and holders["champion"] != holders["challenger"]
    # register asked for the alias, was told the endpoint is missing, and tagged instead.
    assert any(line.startswith(f"POST {ALIAS_PATH}") for line in workspace.seen)


@pytest.mark.slow
def test_the_own_server_job_sends_neither_the_injected_token_nor_the_injected_run(
    tracking_server,
):
    secrets_user = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    received: list = []

    def authenticated(request):
        # The user's server: only the secret's credentials are let in.
        header = next((v for k, v in request.headers.items() if k.lower() == "authorization"), "")
        if header != secrets_user["Authorization"]:
            return 401, b'{"error_code": "UNAUTHENTICATED", "message": "who are you?"}'
        return None

    experiment = f"own-server-{uuid.uuid4().hex[:8]}"
    with (
        azureml_double(tracking_server.uri, token="generate") as workspace,
        reverse_proxy(tracking_server.uri, answer=authenticated, received=received) as (uri, _),
    ):
        job = workspace.start_job("llm-packager")
        before = len(workspace.received)
        command = _job_command(
            PROJECT_DIR / "azureml" / "job-own-server.yml", model="tiny-random-phi3",
            tracking_uri=uri, experiment_name=experiment, steps="fetch_model",
            key_vault_url="https://vault.example", tracking_username_secret="user",
            tracking_password_secret="pass",
        )  # fmt: skip
        environment = {**job.environment(), FETCHER_VARIABLE: FAKE_FETCHER,
                       "PYTHONPATH": str(PROJECT_DIR)}  # fmt: skip
        completed = _run_job(command, environment)
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert received, "the user's server was never asked"
        # Every request to the user's server carried the secret's credentials, none the
        # workspace's token, and none named the workspace's run.
        assert all(authenticated(request) is None for request in received)
        assert not any(job.workspace.token in str(request.headers) for request in received)
        assert not any(job.run_id in request.path or job.run_id.encode() in (request.body or b"")
                       for request in received)  # fmt: skip
        # Nothing of the pipeline went to the workspace.
        assert len(workspace.received) == before
        client = MlflowClient(tracking_uri=tracking_server.uri)
        # main started a run of its own there (no parent), not the workspace's.
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "")
        (main_run,) = [run for run in runs if MLFLOW_PARENT_RUN_ID not in run.data.tags]
        assert main_run.info.run_id != job.run_id
        (fetch,) = _nested_steps(client, main_run.info.experiment_id, main_run.info.run_id)
        assert fetch.info.status == "FINISHED"

"""The shipped Databricks bundle: valid by the vendor's own SDK, and running the ``main`` entry
point with exactly the arguments MLproject declares."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from llm_packager.config.databricks_bundle import DATABRICKS_BUNDLE
from llm_packager.config.parameters import fields_of
from llm_packager.config.specs import MainParameters
from llm_packager.keys import MODEL_NAME_TAG
from llm_packager.project import PROJECT_DIR
from tests.support import copy_tracking_store, project_environment, run_step

MAIN_FLAGS = [f"--{field.name.replace('_', '-')}" for field in fields_of(MainParameters)]


def _bundle() -> dict:
    return yaml.safe_load((PROJECT_DIR / DATABRICKS_BUNDLE).read_text())


def _job() -> dict:
    return _bundle()["resources"]["jobs"]["llm_packager_pipeline"]


def _task_arguments() -> list[str]:
    (task,) = _job()["tasks"]
    return task["spark_python_task"]["parameters"]


def test_the_databricks_job_is_one_task_that_runs_main_with_its_mlproject_flags():
    arguments = _task_arguments()
    assert arguments[0] == "main"
    assert [argument for argument in arguments if argument.startswith("--")] == MAIN_FLAGS
    assert arguments[arguments.index("--env-manager") + 1] == "local"


def test_databricks_registers_to_unity_catalog_with_a_three_level_name():
    arguments = _task_arguments()
    overrides = arguments[arguments.index("--overrides") + 1]
    assert overrides == (
        "register=unity-catalog "
        "register.registered_model_name=${var.catalog}.${var.schema}.${var.registered_model}"
    )
    variables = _bundle()["variables"]
    assert {"catalog", "schema", "model"} <= set(variables)
    assert variables["registered_model"]["default"] == "phi3_mini_4k_instruct_chat"
    assert arguments[arguments.index("--model") + 1] == "${var.model}"


def test_the_bundle_job_validates_with_databricks_bundles():
    from databricks.bundles.jobs import Job

    job = Job.from_dict(_job())
    assert [task.task_key for task in job.tasks] == ["main"]


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

    assert "" not in list(strings(_job()))
    assert all(_task_arguments())


def test_the_job_runs_on_a_runtime_without_its_own_torch_and_logs_to_the_workspace():
    cluster = _job()["job_clusters"][0]["new_cluster"]
    # The standard runtime: no preinstalled torch or torchvision to mix with ours.
    assert "-ml-" not in cluster["spark_version"] and cluster["spark_version"].startswith("15.4")
    assert cluster["spark_env_vars"]["MLFLOW_TRACKING_URI"] == "databricks"
    # No secret scope the user may not have: a Hub token is optional (README).
    assert "secrets/" not in (PROJECT_DIR / DATABRICKS_BUNDLE).read_text()
    assert _bundle()["bundle"]["databricks_cli_version"].startswith(">=")


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

"""The shipped Azure ML jobs: valid by the vendor's own SDK (azure-ai-ml), and running the ``main``
entry point with exactly the arguments MLproject declares."""

from __future__ import annotations

import shutil

import pytest
import yaml

from llm_packager.config.azureml_jobs import AZUREML_JOB, AZUREML_LOCK, AZUREML_OWN_SERVER_JOB
from llm_packager.config.parameters import fields_of
from llm_packager.config.specs import MainParameters
from llm_packager.project import PROJECT_DIR

MAIN_FLAGS = [f"--{field.name.replace('_', '-')}" for field in fields_of(MainParameters)]


def test_the_azure_ml_job_validates_and_builds_its_environment_from_the_azure_lock():
    from azure.ai.ml import load_job

    job = load_job(PROJECT_DIR / AZUREML_JOB)
    assert job.type == "command"
    assert set(job.inputs) == {field.name for field in fields_of(MainParameters)}
    pins = [line for line in (PROJECT_DIR / AZUREML_LOCK).read_text().splitlines()
            if line and not line.startswith("#")]  # fmt: skip
    assert job.environment.conda_file["dependencies"] == ["python=3.11", "pip", {"pip": pins}]
    assert "azureml-mlflow==1.62.0.post6" in pins
    # Installed when the environment is built, never at job start.
    assert "pip install" not in job.command
    assert job.command.startswith("python -m steps.main ")
    assert [word for word in job.command.split() if word.startswith("--")] == MAIN_FLAGS


def test_the_own_server_job_runs_on_the_main_lock_and_logs_where_it_is_told():
    from azure.ai.ml import load_job

    job = load_job(PROJECT_DIR / AZUREML_OWN_SERVER_JOB)
    assert set(job.inputs) == {"tracking_uri", *(f.name for f in fields_of(MainParameters))}
    assert job.command.startswith(
        "MLFLOW_TRACKING_URI=${{inputs.tracking_uri}} python -m steps.main"
    )
    assert (
        job.environment.conda_file["dependencies"]
        == yaml.safe_load((PROJECT_DIR / "conda.yaml").read_text())["dependencies"]
    )


def test_the_azure_ml_loader_refuses_a_bad_job_so_the_check_can_fail(tmp_path):
    from azure.ai.ml import load_job
    from marshmallow.exceptions import ValidationError

    document = yaml.safe_load((PROJECT_DIR / AZUREML_JOB).read_text())
    document["comand"] = document.pop("command")
    folder = tmp_path / "azureml"
    folder.mkdir()
    shutil.copy(PROJECT_DIR / "conda.yaml", tmp_path / "conda.yaml")
    (folder / "job.yml").write_text(yaml.safe_dump(document))
    with pytest.raises(ValidationError) as refused:
        load_job(folder / "job.yml")
    assert "comand" in str(refused.value)
    assert "Unknown field." in str(refused.value)

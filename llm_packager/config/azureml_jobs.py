"""The Azure ML v2 command jobs (``azureml/job.yml``, ``azureml/job-own-server.yml``) and the
environment they run in (``azureml/environment.yml``)."""

from __future__ import annotations

import shlex
from pathlib import Path

from omegaconf import DictConfig

from llm_packager.config.parameters import as_mlflow_parameters, fields_of
from llm_packager.config.remote_jobs import GENERATED, main_arguments
from llm_packager.config.specs import MainParameters

AZUREML_JOB = Path("azureml") / "job.yml"
AZUREML_OWN_SERVER_JOB = Path("azureml") / "job-own-server.yml"
AZUREML_ENVIRONMENT = Path("azureml") / "environment.yml"
AZUREML_LOCK = Path("requirements-azureml.txt")
AZUREML_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-ubuntu24.04:latest"


def azureml_environment(lock: Path) -> dict[str, object]:
    """A conda environment for Azure ML jobs with every pin of ``lock``: the packages are
    installed when Azure ML builds the environment, never at job start."""
    pins = [
        line.strip()
        for line in lock.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return {
        "name": "llm-packager-azureml",
        "channels": ["conda-forge"],
        "dependencies": ["python=3.11", "pip", {"pip": pins}],
    }


def azureml_job(
    cfg: DictConfig, model: str, overrides: str, *, own_server: bool = False
) -> dict[str, object]:
    """An Azure ML v2 command job that runs the ``main`` entry point with these inputs.

    By default it logs to the workspace (azureml-mlflow, on the Azure lock, models as run
    artifacts since the workspace has no LoggedModel API); ``own_server`` logs to the user's
    MLflow server instead (``inputs.tracking_uri``), on the project's main lock.
    """
    inputs: dict[str, str] = as_mlflow_parameters(
        # Azure ML refuses an empty input value; main reads "none" as no overrides.
        MainParameters(model=model, overrides=overrides or "none", env_manager="local")
    )
    arguments = main_arguments(
        {field.name: f"${{{{inputs.{field.name}}}}}" for field in fields_of(MainParameters)}
    )
    command = shlex.join(["python", "-m", "steps.main", *arguments])
    if own_server:
        inputs = {"tracking_uri": "https://your-mlflow-server.example.com", **inputs}
        command = "MLFLOW_TRACKING_URI=${{inputs.tracking_uri}} " + command
        environment = {"image": AZUREML_IMAGE, "conda_file": "../conda.yaml"}
        where = "your MLflow server"
    else:
        environment = {"image": AZUREML_IMAGE, "conda_file": AZUREML_ENVIRONMENT.name}
        where = "the workspace"
    return {
        "$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
        "type": "command",
        "display_name": f"llm-packager main ({cfg.model.name}, logging to {where})",
        "experiment_name": "llm-packager",
        "description": GENERATED,
        "code": "..",
        "command": command,
        "inputs": inputs,
        "environment": environment,
        "compute": "azureml:cpu-cluster",
        "environment_variables": {"HF_HUB_DISABLE_TELEMETRY": "1"},
    }

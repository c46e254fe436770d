"""The shipped Azure ML jobs: valid by the vendor's own SDK (azure-ai-ml), and running the ``main``
entry point with exactly the arguments MLproject declares."""

from __future__ import annotations

import shutil

import pytest
import yaml

from llm_packager.config.azureml_jobs import (
    AZUREML_GPU_JOB,
    AZUREML_JOB,
    AZUREML_LOCK,
    AZUREML_OWN_SERVER_JOB,
    CUDA_LOCK,
    LAUNCHER,
    MAIN_LOCK,
    SECRETS_LOCK,
    TORCH_CPU_INDEX,
    VM_SIZES,
)
from llm_packager.config.parameters import fields_of
from llm_packager.config.specs import MainParameters
from llm_packager.project import PROJECT_DIR

MAIN_FLAGS = [f"--{field.name.replace('_', '-')}" for field in fields_of(MainParameters)]


def test_the_azure_ml_job_validates_and_builds_its_environment_from_the_azure_lock():
    from azure.ai.ml import load_job

    job = load_job(PROJECT_DIR / AZUREML_JOB)
    assert job.type == "command"
    assert set(job.inputs) == {field.name for field in fields_of(MainParameters)}
    pins = _lock(AZUREML_LOCK)
    assert job.environment.conda_file["dependencies"] == ["python=3.11", "pip", {"pip": _cpu(pins)}]
    assert "azureml-mlflow==1.62.0.post6" in pins
    # Installed when the environment is built, never at job start.
    assert "pip install" not in job.command
    assert job.command.startswith("python -m steps.main ")
    assert [word for word in job.command.split() if word.startswith("--")] == MAIN_FLAGS


def _lock(path) -> list[str]:
    lines = (PROJECT_DIR / path).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _cpu(pins: list[str]) -> list[str]:
    """The pins as a CPU job installs them: torch's CPU build from PyTorch's CPU index."""
    return [f"--extra-index-url {TORCH_CPU_INDEX}",
            *(f"{pin}+cpu" if pin.startswith("torch==") else pin for pin in pins)]  # fmt: skip


def test_the_own_server_job_reads_its_credentials_from_key_vault_on_the_main_lock():
    from azure.ai.ml import load_job

    job = load_job(PROJECT_DIR / AZUREML_OWN_SERVER_JOB)
    secrets = {"tracking_uri", "experiment_name", "key_vault_url", "tracking_username_secret",
               "tracking_password_secret"}  # fmt: skip
    assert set(job.inputs) == secrets | {f.name for f in fields_of(MainParameters)}
    # Secret names only: no input can carry a password.
    assert not any("password" in name and "secret" not in name for name in job.inputs)
    assert job.command.startswith(f"python -m {LAUNCHER} --tracking-uri")
    _, _, main = job.command.partition(" -- ")
    assert main.startswith("python -m steps.main ")
    assert [word for word in main.split() if word.startswith("--")] == MAIN_FLAGS
    assert job.identity.type == "managed_identity"  # azure-ai-ml's name for `type: managed`
    # The main lock and the Key Vault client, and nothing of the Azure lock's MLflow.
    pins = _lock(MAIN_LOCK) + _lock(SECRETS_LOCK)
    assert job.environment.conda_file["dependencies"] == ["python=3.11", "pip", {"pip": _cpu(pins)}]
    assert "azure-keyvault-secrets==4.12.0" in pins and "azureml-mlflow" not in str(pins)


def test_the_secrets_lock_adds_only_what_the_main_lock_lacks_at_the_dev_locks_pins():
    def name(pin: str) -> str:
        return pin.split("==")[0].lower().replace("_", "-")

    main = {name(pin) for pin in _lock(MAIN_LOCK)}
    dev = set(_lock("requirements-dev.txt"))
    extra = _lock(SECRETS_LOCK)
    assert not {name(pin) for pin in extra} & main
    # Every one at the dev lock's pin: the launcher's Key Vault reader is tested with these.
    assert {pin for pin in extra if pin not in dev} == set()
    assert "azure-keyvault-secrets==4.12.0" in extra


def test_the_gpu_job_validates_with_the_cuda_packages_and_a_gpu_vm():
    from azure.ai.ml import load_job

    job = load_job(PROJECT_DIR / AZUREML_GPU_JOB)
    assert job.compute == "gpu-cluster"
    assert "never run by us" in job.display_name
    assert job.inputs["overrides"]._data == "onnx=prebuilt-cuda"
    pip = job.environment.conda_file["dependencies"][2]["pip"]
    assert set(_lock(CUDA_LOCK)) <= set(pip)
    assert not {"onnxruntime-genai==0.18.0", "onnxruntime==1.31.1"} & set(pip)
    assert not any(TORCH_CPU_INDEX in pin or "+cpu" in pin for pin in pip)
    assert VM_SIZES["prebuilt-cuda"] in job.description


def test_the_cpu_jobs_name_a_vm_size_for_each_onnx_choice_from_the_measured_memory():
    from azure.ai.ml import load_job

    for path in (AZUREML_JOB, AZUREML_OWN_SERVER_JOB):
        description = load_job(PROJECT_DIR / path).description
        assert VM_SIZES["prebuilt"] in description and VM_SIZES["build"] in description
    # onnx=build's model builder peaks at 25.7 GiB for Phi-3-mini (docs/performance.md): more
    # than a 32 GiB VM leaves once the OS has its share, so build gets the 64 GiB size.
    assert VM_SIZES["build"] == "Standard_E8ds_v5"
    assert VM_SIZES["prebuilt"] == "Standard_E4ds_v5"


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

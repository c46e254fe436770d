"""The own-server Azure ML job's launcher: the injected MLflow variables go, the secret store's
credentials come, and the command runs with them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llm_packager.pipeline.azureml_launcher import (
    FETCHER_VARIABLE,
    LauncherError,
    fetcher_for,
    main,
    server_environment,
)
from llm_packager.project import PROJECT_DIR

INJECTED = {
    "MLFLOW_TRACKING_URI": "azureml://eastus.api.azureml.ms/mlflow/v2.0/subscriptions/x",
    "MLFLOW_RUN_ID": "azure-job-run",
    "MLFLOW_EXPERIMENT_ID": "azure-experiment",
    "MLFLOW_TRACKING_TOKEN": "azure-token",
}
SECRETS = {"user": "alice", "pass": "s3cret", "token": "server-token"}
# The offline stand-in for Key Vault, named as a job would name another store.
FAKE_FETCHER = "tests.pipeline.test_azureml_launcher:fake_store"


def fake_store(vault_url: str):
    assert vault_url == "https://vault.example"
    return SECRETS.__getitem__


def test_the_injected_variables_go_and_the_secrets_credentials_come():
    environment = server_environment({**INJECTED, "PATH": "/bin"}, SECRETS.__getitem__,
                                     "https://mlflow.example", username_secret="user",
                                     password_secret="pass")  # fmt: skip
    assert environment == {
        "PATH": "/bin",
        "MLFLOW_TRACKING_URI": "https://mlflow.example",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
    }


def test_a_token_secret_replaces_the_injected_token():
    environment = server_environment(INJECTED, SECRETS.__getitem__, "https://mlflow.example",
                                     token_secret="token")  # fmt: skip
    assert environment["MLFLOW_TRACKING_TOKEN"] == "server-token"
    assert "MLFLOW_RUN_ID" not in environment and "MLFLOW_EXPERIMENT_ID" not in environment


def test_no_secret_named_is_refused_before_anything_runs():
    with pytest.raises(LauncherError, match="--token-secret"):
        server_environment(INJECTED, SECRETS.__getitem__, "https://mlflow.example",
                           username_secret="user")  # fmt: skip


def test_a_secret_store_failure_stops_the_launch():
    def unreachable(name: str) -> str:
        raise PermissionError(f"the identity may not read {name}")

    with pytest.raises(PermissionError, match="may not read user"):
        server_environment(INJECTED, unreachable, "https://mlflow.example",
                           username_secret="user", password_secret="pass")  # fmt: skip


def test_the_fetcher_is_key_vault_unless_another_is_named():
    fetch = fetcher_for("https://vault.example", {FETCHER_VARIABLE: FAKE_FETCHER})
    assert fetch("user") == "alice"
    command, environment = main(
        ["--tracking-uri", "https://mlflow.example", "--key-vault-url", "https://vault.example",
         "--token-secret", "token", "--", "python", "-m", "steps.main"],
        {**INJECTED, FETCHER_VARIABLE: FAKE_FETCHER},
    )  # fmt: skip
    assert command == ["python", "-m", "steps.main"]
    assert environment["MLFLOW_TRACKING_TOKEN"] == "server-token"


def test_the_launched_command_sees_only_the_servers_credentials():
    script = "import os, json; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('MLFLOW_')}))"  # noqa: E501
    completed = subprocess.run(
        [sys.executable, "-m", "llm_packager.pipeline.azureml_launcher",
         "--tracking-uri", "https://mlflow.example", "--key-vault-url", "https://vault.example",
         "--username-secret", "user", "--password-secret", "pass",
         "--", sys.executable, "-c", script],
        env={**INJECTED, FETCHER_VARIABLE: FAKE_FETCHER, "PYTHONPATH": str(PROJECT_DIR)},
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
    }


def test_a_launch_without_a_command_is_refused_in_one_line():
    completed = subprocess.run(
        [sys.executable, "-m", "llm_packager.pipeline.azureml_launcher", "--tracking-uri", "x",
         "--key-vault-url", "y", "--token-secret", "t"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip() == "error: Give the command to run after --"


def test_key_vault_is_read_with_the_jobs_managed_identity(monkeypatch):
    import azure.identity
    import azure.keyvault.secrets

    from llm_packager.pipeline.azureml_launcher import key_vault_fetcher

    made: dict[str, object] = {}

    class ManagedIdentity:
        def __init__(self, **options):
            made["identity"] = options

    class Vault:
        # azure-keyvault-secrets' SecretClient: get_secret(name) -> KeyVaultSecret with .value
        def __init__(self, vault_url, credential):
            made["vault"], made["credential"] = vault_url, credential

        def get_secret(self, name):
            return type("KeyVaultSecret", (), {"value": f"value of {name}"})()

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", ManagedIdentity)
    monkeypatch.setattr(azure.keyvault.secrets, "SecretClient", Vault)
    monkeypatch.setenv("DEFAULT_IDENTITY_CLIENT_ID", "client-id-of-the-user-assigned-identity")
    fetch = key_vault_fetcher("https://my-vault.vault.azure.net/")
    assert fetch("mlflow-password") == "value of mlflow-password"
    assert made["vault"] == "https://my-vault.vault.azure.net/"
    assert isinstance(made["credential"], ManagedIdentity)
    assert made["identity"] == {
        "managed_identity_client_id": "client-id-of-the-user-assigned-identity"
    }

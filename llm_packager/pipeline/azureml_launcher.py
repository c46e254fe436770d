"""The own-server Azure ML job's launcher: point MLflow at the user's server with credentials read
from a secret store, take away what Azure ML injected, then run the pipeline's command.

Azure ML creates an MLflow run for every job in its own workspace and injects
``MLFLOW_TRACKING_URI``, ``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_ID`` and ``MLFLOW_TRACKING_TOKEN``
into the job's process, overriding values the job sets (Azure/azure-sdk-for-python#38813;
zenml-io/zenml#4407, whose fix clears them). Left in place, ``main`` would resume the workspace's
run id on the user's server and send it the workspace's token. The job's command is therefore::

    python -m llm_packager.pipeline.azureml_launcher --tracking-uri <uri> \\
        --key-vault-url <vault> --username-secret <name> --password-secret <name> \\
        -- python -m steps.main ...

and this module replaces the injected variables with ``MLFLOW_TRACKING_URI`` (and
``MLFLOW_EXPERIMENT_NAME`` from ``--experiment-name``) and either
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN`` read from
Key Vault, then replaces itself with the command (``os.execvpe``). Key Vault is read as
Microsoft's "Use authentication credential secrets in Azure Machine Learning jobs" shows:
``azure-keyvault-secrets``' ``SecretClient`` with ``DefaultAzureCredential``, which in a job with
``identity: {type: managed}`` is the compute's managed identity; secrets never travel as plain
job inputs, only their names do.

Where secrets come from is one function, ``(vault_url) -> fetch(name) -> value``: the Key Vault
one by default, or ``module:function`` named by ``LLM_PACKAGER_SECRET_FETCHER`` (another store, or
a test's offline stand-in).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping

from llm_packager.errors import UserError

# What Azure ML injects into every job; none of it belongs to the user's server.
INJECTED_VARIABLES = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                      "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI")  # fmt: skip
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                        "MLFLOW_TRACKING_TOKEN")  # fmt: skip
FETCHER_VARIABLE = "LLM_PACKAGER_SECRET_FETCHER"

SecretFetcher = Callable[[str], str]


class LauncherError(UserError):
    """The launcher was called in a way it cannot run."""


def key_vault_fetcher(vault_url: str) -> SecretFetcher:
    """Read secrets from the Key Vault at ``vault_url`` as the job's identity (a managed identity
    on Azure ML compute; ``DEFAULT_IDENTITY_CLIENT_ID`` names a user-assigned one)."""
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.secrets import SecretClient

    credential = DefaultAzureCredential(
        managed_identity_client_id=os.environ.get("DEFAULT_IDENTITY_CLIENT_ID")
    )
    client = SecretClient(vault_url=vault_url, credential=credential)
    return lambda name: client.get_secret(name).value


def fetcher_for(vault_url: str, environ: Mapping[str, str]) -> SecretFetcher:
    """The Key Vault fetcher, or the ``module:function`` that ``LLM_PACKAGER_SECRET_FETCHER``
    names, called with the vault URL."""
    named = environ.get(FETCHER_VARIABLE)
    if not named:
        return key_vault_fetcher(vault_url)
    module, _, function = named.partition(":")
    return getattr(importlib.import_module(module), function)(vault_url)


def server_environment(
    environ: Mapping[str, str],
    fetch: SecretFetcher,
    tracking_uri: str,
    *,
    experiment_name: str = "",
    username_secret: str = "",
    password_secret: str = "",
    token_secret: str = "",
) -> dict[str, str]:
    """``environ`` without what Azure ML injected, logging to ``tracking_uri`` (in
    ``experiment_name`` if given) with the credentials the named secrets hold: a token, or a user
    name and password.

    Raises:
        LauncherError: neither a token secret nor both user name and password secrets given.
    """
    if not token_secret and not (username_secret and password_secret):
        raise LauncherError(
            "Name the secrets that hold the MLflow server's credentials: --token-secret, or "
            "--username-secret and --password-secret"
        )
    environment = {
        key: value
        for key, value in environ.items()
        if key not in INJECTED_VARIABLES + CREDENTIAL_VARIABLES
    }
    environment["MLFLOW_TRACKING_URI"] = tracking_uri
    if experiment_name:
        environment["MLFLOW_EXPERIMENT_NAME"] = experiment_name
    if token_secret:
        environment["MLFLOW_TRACKING_TOKEN"] = fetch(token_secret)
    else:
        environment["MLFLOW_TRACKING_USERNAME"] = fetch(username_secret)
        environment["MLFLOW_TRACKING_PASSWORD"] = fetch(password_secret)
    return environment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__name__}",
        description="Run a command against your MLflow server from an Azure ML job.",
    )
    parser.add_argument("--tracking-uri", required=True, help="your MLflow server")
    parser.add_argument("--experiment-name", default="", help="the experiment on your server")
    parser.add_argument("--key-vault-url", required=True,
                        help="https://<vault>.vault.azure.net")  # fmt: skip
    parser.add_argument("--username-secret", default="", help="secret holding the user name")
    parser.add_argument("--password-secret", default="", help="secret holding the password")
    parser.add_argument("--token-secret", default="", help="secret holding a bearer token")
    return parser


def main(argv: list[str], environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command after ``--`` and the environment to run it in."""
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise LauncherError("Give the command to run after --")
    split = argv.index("--")
    options = _parser().parse_args(argv[:split])
    fetch = fetcher_for(options.key_vault_url, environ)
    environment = server_environment(
        environ, fetch, options.tracking_uri, experiment_name=options.experiment_name,
        username_secret=options.username_secret,
        password_secret=options.password_secret, token_secret=options.token_secret,
    )  # fmt: skip
    return argv[split + 1 :], environment


if __name__ == "__main__":
    try:
        command, environment = main(sys.argv[1:], os.environ)
    except LauncherError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    os.execvpe(command[0], command, environment)

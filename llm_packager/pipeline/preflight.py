"""Preflight: before `main` creates any step run, check with idempotent calls that the pipeline's
ends are reachable and writable, so that a wrong catalog or a missing grant fails in the first
minute, naming the fix, instead of at `register` after hours of work.

What is probed, in order:

1. **The tracking server and the credentials**: main's own run under `mlflow run`
   (``MLFLOW_RUN_ID``), else the experiment main will use (got by name, or created as starting
   main's run would create it), else one experiment search. A 401 or 403 names the credentials to
   fix; an unreachable server is told as everywhere else (`llm_packager.errors.one_line`).
2. **The registry, when the run includes `register`** (a run of `-P steps=fetch_model` must not
   need the right to register): for Unity Catalog (``register.registry_uri=databricks-uc``), the
   catalog and then the schema of ``register.registered_model_name`` (GET, which needs USE CATALOG
   and USE SCHEMA); then, for every registry, the registered model `register` would create is got
   or created, and one that already exists is updated with its own description, a write that
   changes nothing but proves the right to write (a read-only registry refuses it).

Each refusal is a `PreflightError`, one line naming the fix; `main` exits with code 2 (bad input).
Every call is bounded by the retry settings `main` sets from ``tracking.server_timeout_s``.
"""

from __future__ import annotations

import os
import re

from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from llm_packager.config.specs import REGISTER
from llm_packager.errors import UserError, is_server_unreachable, one_line
from llm_packager.models.registry import is_unity_catalog

# Error codes a missing catalog, schema or model is answered with: the one Unity Catalog's REST API
# answers (the Databricks double, tests/databricks_double.py), and the specific ones MLflow's
# error codes also define (mlflow/protos/databricks.proto).
_MISSING = {"RESOURCE_DOES_NOT_EXIST", "CATALOG_DOES_NOT_EXIST", "SCHEMA_DOES_NOT_EXIST",
            "NOT_FOUND"}  # fmt: skip
# A response MLflow could not read as an error body keeps only its HTTP status, in the text.
_STATUS_IN_TEXT = re.compile(r"error code (\d{3}) != 200")
_CREDENTIALS_FIX = (
    "check the credentials: DATABRICKS_TOKEN, or the profile (DATABRICKS_CONFIG_PROFILE, "
    "~/.databrickscfg) for Databricks; MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD for an MLflow server; and that they may use the experiment"
)
_AUTO_CATALOG = (
    "workspaces where Unity Catalog was enabled automatically have a catalog named after the "
    "workspace instead of 'main'"
)


class PreflightError(UserError):
    """A check before any step run found that the pipeline could not finish; the message names
    the fix. ``tracking_reachable`` is False when the tracking server itself failed, so nothing
    more should be asked of it (not even tagging main's run)."""

    def __init__(self, message: str, *, tracking_reachable: bool = True) -> None:
        super().__init__(message)
        self.tracking_reachable = tracking_reachable


def preflight(cfg: DictConfig, steps: list[str]) -> None:
    """Probe the tracking server, and the registry if ``steps`` include `register`.

    Raises:
        PreflightError: naming the fix (credentials, catalog, schema, grant).
    """
    check_tracking()
    if REGISTER.entry_point in steps:
        check_registry(cfg.register.registered_model_name, cfg.register.registry_uri)


def _http_status(error: MlflowException) -> int | None:
    if match := _STATUS_IN_TEXT.search(error.message):
        return int(match.group(1))
    return error.get_http_status_code()


def _refused_credentials(error: MlflowException) -> bool:
    return _http_status(error) in (401, 403) or error.error_code in (
        "UNAUTHENTICATED", "PERMISSION_DENIED")  # fmt: skip


def _unreachable(error: BaseException) -> PreflightError:
    return PreflightError(one_line(error) or str(error), tracking_reachable=False)


def check_tracking() -> None:
    """The tracking server answers, these credentials work, and main's experiment is there.

    Raises:
        PreflightError: the server is unreachable or refuses the credentials.
    """
    import mlflow

    client = MlflowClient()
    try:
        if run_id := os.environ.get("MLFLOW_RUN_ID"):
            client.get_run(run_id)
        elif name := os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name)
        elif experiment_id := os.environ.get("MLFLOW_EXPERIMENT_ID"):
            client.get_experiment(experiment_id)
        else:
            client.search_experiments(max_results=1)
    except MlflowException as error:
        if is_server_unreachable(error):
            raise _unreachable(error) from error
        if _refused_credentials(error):
            raise PreflightError(
                f"The tracking server {mlflow.get_tracking_uri()} refused the request "
                f"({_short(error)}): {_CREDENTIALS_FIX}",
                tracking_reachable=False,
            ) from error
        raise
    except OSError as error:  # requests' connection errors are OSErrors
        if is_server_unreachable(error):
            raise _unreachable(error) from error
        raise


def _short(error: MlflowException) -> str:
    """The server's own words, without the client configuration databricks-sdk appends to them
    (". Config: host=..., auth_type=..., Env: ...")."""
    return " ".join(error.message.split(" Config: ")[0].split())[:200]


def _uc_get(host_creds, path: str) -> None:
    """GET a Unity Catalog REST endpoint; raise its error as MLflow raises a REST error."""
    from mlflow.utils.rest_utils import http_request

    response = http_request(host_creds, path, "GET")
    if response.status_code == 200:
        return
    try:
        body = response.json()
    except ValueError:
        raise MlflowException(
            f"API request to endpoint {path} failed with error code {response.status_code} != "
            f"200. Response body: '{response.text[:200]}'"
        ) from None
    raise RestException(body)


def _check_catalog_and_schema(registry_uri: str, catalog: str, schema: str, name: str) -> None:
    from mlflow.utils.databricks_utils import get_databricks_host_creds

    host_creds = get_databricks_host_creds(registry_uri)
    probes = (
        (f"/api/2.1/unity-catalog/catalogs/{catalog}",
         f"Unity Catalog has no catalog '{catalog}' (from register.registered_model_name={name}): "
         f"name a catalog you have, -P overrides=\"register=unity-catalog "
         f"register.registered_model_name=<catalog>.{schema}.{name.split('.')[-1]}\" (the "
         f"Databricks job: --var catalog=<catalog>); {_AUTO_CATALOG}",
         f"You may not use the catalog '{catalog}': ask for USE CATALOG on it (GRANT USE CATALOG "
         f"ON CATALOG {catalog} TO <you>), or name a catalog you can use in "
         "register.registered_model_name"),
        (f"/api/2.1/unity-catalog/schemas/{catalog}.{schema}",
         f"Unity Catalog has no schema '{catalog}.{schema}' (from "
         f"register.registered_model_name={name}): name an existing schema (the Databricks job: "
         f"--var schema=<schema>), or create it (CREATE SCHEMA {catalog}.{schema})",
         f"You may not use the schema '{catalog}.{schema}': ask for USE SCHEMA on it (GRANT USE "
         f"SCHEMA ON SCHEMA {catalog}.{schema} TO <you>), or name a schema you can use"),
    )  # fmt: skip
    for path, missing, denied in probes:
        try:
            _uc_get(host_creds, path)
        except MlflowException as error:
            if error.error_code in _MISSING or _http_status(error) == 404:
                raise PreflightError(missing) from error
            if _refused_credentials(error):
                raise PreflightError(f"{denied} ({_short(error)})") from error
            raise


def _write_denied(name: str, registry_uri: str, error: MlflowException) -> PreflightError:
    parts = name.split(".")
    if len(parts) == 3:
        catalog, schema, _ = parts
        fix = (
            f"registering needs USE CATALOG on {catalog}, USE SCHEMA and CREATE MODEL on "
            f"{catalog}.{schema} (GRANT CREATE MODEL ON SCHEMA {catalog}.{schema} TO <you>), and "
            "MODIFY or ownership of an existing model; or set register.registered_model_name to "
            "a schema you can write"
        )
    else:
        fix = (
            "ask for the right to create and edit registered models there, or set "
            "register.registered_model_name to a model you may write"
        )
    where = registry_uri or "the tracking server's registry"
    return PreflightError(
        f"The registry ({where}) refused to write the registered model {name} "
        f"({_short(error)}): {fix}"
    )


def check_registry(name: str, registry_uri: str) -> None:
    """The registered model `register` would write can be got or created, and written.

    Raises:
        PreflightError: a missing catalog or schema, or no right to write, naming the fix.
    """
    parts = name.split(".")
    if is_unity_catalog(registry_uri) and len(parts) == 3:
        _check_catalog_and_schema(registry_uri, parts[0], parts[1], name)
    client = MlflowClient(registry_uri=registry_uri or None)
    try:
        try:
            model = client.get_registered_model(name)
        except MlflowException as error:
            if error.error_code not in _MISSING:
                raise
            try:
                client.create_registered_model(name)
            except MlflowException as created:
                # Another main made it between the two calls (two pipelines at once): the
                # write right is proven by that one, and the model is there.
                if created.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        else:
            # A write that changes nothing: the model's own description, set again.
            client.update_registered_model(name, description=model.description or "")
    except MlflowException as error:
        if is_server_unreachable(error):
            raise _unreachable(error) from error
        if error.error_code in _MISSING:
            raise PreflightError(
                f"The registry ({registry_uri or 'the tracking server'}) cannot hold {name}: "
                f"{_short(error)}. Set register.registered_model_name to an existing "
                f"catalog.schema.model; {_AUTO_CATALOG}"
            ) from error
        if _refused_credentials(error):
            raise _write_denied(name, registry_uri, error) from error
        raise

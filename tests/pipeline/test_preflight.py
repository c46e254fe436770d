"""The preflight's probes against the Databricks double (tests/databricks_double.py) in front of
the session's real `mlflow server`: each refusal names its fix, a registry that is fine is left
holding exactly the registered model `register` would create, and nothing is probed that the run
does not need. The same refusals through `mlflow run` are in
tests/integration/test_databricks_double.py."""

from __future__ import annotations

import socket
import uuid

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from llm_packager.pipeline.preflight import (
    PreflightError,
    check_registry,
    check_tracking,
    preflight,
)
from tests.databricks_double import UnityCatalog, calls_by_path, databricks_double
from tests.support import TrackingServer, tracking_uri

pytestmark = pytest.mark.slow  # the session's tracking server

UC = "databricks-uc"
CATALOG_GET = "GET /api/2.1/unity-catalog/catalogs/main"
SCHEMA_GET = "GET /api/2.1/unity-catalog/schemas/main.default"


def _name(catalog: str = "main", schema: str = "default") -> str:
    return f"{catalog}.{schema}.preflight_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def databricks_host(monkeypatch):
    """Point MLflow's ``databricks-uc`` credentials at a double: what a user exports."""

    def point(uri: str) -> None:
        monkeypatch.setenv("DATABRICKS_HOST", uri)
        monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-test")
        monkeypatch.delenv("DATABRICKS_CONFIG_PROFILE", raising=False)

    return point


def _held(server: TrackingServer, name: str) -> bool:
    """Whether the real server behind the double holds the registered model ``name``."""
    models = MlflowClient(tracking_uri=server.uri).search_registered_models(f"name = '{name}'")
    return [model.name for model in models] == [name]


def test_unity_catalog_checks_catalog_and_schema_then_gets_or_creates_the_model(
    tracking_server: TrackingServer, databricks_host
):
    name = _name()
    with databricks_double(tracking_server.uri, UnityCatalog()) as (uri, seen):
        databricks_host(uri)
        with tracking_uri(uri):
            check_registry(name, UC)
            first = calls_by_path(seen)
            seen.clear()
            check_registry(name, UC)  # again: the model exists, and is written unchanged
            again = calls_by_path(seen)
    assert _held(tracking_server, name)
    # Through MLflow's own Unity Catalog store, the endpoints a workspace answers.
    assert first[CATALOG_GET] == first[SCHEMA_GET] == 1
    assert first["GET /api/2.0/mlflow/unity-catalog/registered-models/get"] == 1
    assert first["POST /api/2.0/mlflow/unity-catalog/registered-models/create"] == 1
    assert "POST /api/2.0/mlflow/unity-catalog/registered-models/create" not in again
    assert again["PATCH /api/2.0/mlflow/unity-catalog/registered-models/update"] == 1


def test_a_missing_catalog_is_refused_naming_the_catalog_to_set(
    tracking_server: TrackingServer, databricks_host
):
    name = _name(catalog="main")
    # A workspace where Unity Catalog was enabled automatically: its catalog is its own name.
    workspace = UnityCatalog(catalogs={"adb_1234567890": {"default"}})
    with databricks_double(tracking_server.uri, workspace) as (uri, seen):
        databricks_host(uri)
        with tracking_uri(uri), pytest.raises(PreflightError) as refused:
            check_registry(name, UC)
    message = str(refused.value)
    assert "\n" not in message
    assert "no catalog 'main'" in message
    assert "register.registered_model_name=<catalog>.default." in message
    assert "--var catalog=<catalog>" in message
    assert "named after the workspace" in message
    assert not _held(tracking_server, name)
    assert SCHEMA_GET not in calls_by_path(seen)  # the first failure is the one told


def test_a_missing_schema_is_refused_naming_the_schema(
    tracking_server: TrackingServer, databricks_host
):
    name = _name(schema="ml")
    with databricks_double(tracking_server.uri, UnityCatalog()) as (uri, _):
        databricks_host(uri)
        with tracking_uri(uri), pytest.raises(PreflightError) as refused:
            check_registry(name, UC)
    assert "no schema 'main.ml'" in str(refused.value)
    assert "CREATE SCHEMA main.ml" in str(refused.value)


@pytest.mark.parametrize("exists", [False, True], ids=["new-model", "existing-model"])
def test_a_read_only_registry_is_refused_naming_the_grants(
    tracking_server: TrackingServer, databricks_host, exists
):
    name = _name()
    if exists:  # registered by an earlier run, before the rights were taken away
        MlflowClient(tracking_uri=tracking_server.uri).create_registered_model(name)
    with databricks_double(tracking_server.uri, UnityCatalog(read_only=True)) as (uri, seen):
        databricks_host(uri)
        with tracking_uri(uri), pytest.raises(PreflightError) as refused:
            check_registry(name, UC)
    message = str(refused.value)
    assert "PERMISSION_DENIED" in message
    assert "USE CATALOG on main, USE SCHEMA and CREATE MODEL on main.default" in message
    assert "GRANT CREATE MODEL ON SCHEMA main.default" in message
    assert _held(tracking_server, name) == exists
    write = "PATCH /api/2.0/mlflow/unity-catalog/registered-models/update" if exists else (
        "POST /api/2.0/mlflow/unity-catalog/registered-models/create")  # fmt: skip
    assert calls_by_path(seen)[write] == 1


def test_the_workspace_registry_is_probed_by_the_same_get_or_create(
    tracking_server: TrackingServer,
):
    name = _name()
    with (
        databricks_double(tracking_server.uri, UnityCatalog(read_only=True)) as (uri, _),
        tracking_uri(uri),
        pytest.raises(PreflightError) as refused,
    ):
        check_registry(name, "")
    assert "refused to write the registered model" in str(refused.value)
    with databricks_double(tracking_server.uri, UnityCatalog()) as (uri, _), tracking_uri(uri):
        check_registry(name, "")
    assert _held(tracking_server, name)


def test_the_registry_is_not_probed_when_register_does_not_run(tracking_server: TrackingServer):
    config = OmegaConf.create({"register": {"registered_model_name": _name(), "registry_uri": ""}})
    read_only = UnityCatalog(read_only=True)
    with databricks_double(tracking_server.uri, read_only) as (uri, seen), tracking_uri(uri):
        preflight(config, ["fetch_model"])
        assert not any("registered-models" in line for line in seen)
        with pytest.raises(PreflightError):
            preflight(config, ["fetch_model", "register"])


def test_refused_credentials_name_the_token_to_fix(tracking_server: TrackingServer, monkeypatch):
    with databricks_double(tracking_server.uri, token="the-right-token") as (uri, _):
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "a-stale-token")
        with tracking_uri(uri), pytest.raises(PreflightError) as refused:
            check_tracking()
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "the-right-token")
        with tracking_uri(uri):
            check_tracking()
    message = str(refused.value)
    assert "Invalid access token" in message
    assert "DATABRICKS_TOKEN" in message and "MLFLOW_TRACKING_TOKEN" in message
    assert not refused.value.tracking_reachable  # main does not tag its run through it


def test_an_unreachable_server_is_told_in_one_line_without_waiting(monkeypatch):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with tracking_uri(f"http://127.0.0.1:{port}"), pytest.raises(PreflightError) as refused:
        check_tracking()
    assert "cannot be reached" in str(refused.value)
    assert not refused.value.tracking_reachable


def test_the_experiment_main_will_use_is_created_when_missing(
    tracking_server: TrackingServer, monkeypatch
):
    experiment = f"preflight-{uuid.uuid4().hex[:8]}"
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    with databricks_double(tracking_server.uri) as (uri, _), tracking_uri(uri):
        check_tracking()
        check_tracking()  # idempotent: got the second time
    assert MlflowClient(tracking_uri=tracking_server.uri).get_experiment_by_name(experiment)

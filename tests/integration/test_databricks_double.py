"""The pipeline through a double that enforces what Databricks documents
(tests/databricks_double.py): the double refuses what Databricks refuses (search limits; in Unity
Catalog mode two-level names, stages, a missing catalog), the search main made at every start
before it paged would have died there, the abandoned-model cleanup neither breaks the limits nor
costs more calls when the experiment holds more LoggedModels, main's preflight refuses a missing
catalog and a read-only registry within the first minute, and the whole pipeline runs in Unity
Catalog mode, cold and warm, a warm start costing the same calls with 0 or 120 other
LoggedModels."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from llm_packager.config.specs import step_names
from llm_packager.keys import (
    ERROR_TAG,
    LOGGING_MODEL_TAG,
    REGISTERED_VERSION_TAG,
    REGISTRATION_STATUS_TAG,
    STEPS_REUSED_TAG,
)
from llm_packager.models.model_store import (
    fail_abandoned_models,
    pending_models,
    runs_left_logging,
)
from llm_packager.project import PROJECT_DIR
from tests.databricks_double import (
    SEARCH_LIMITS,
    UnityCatalog,
    calls_by_path,
    databricks_double,
)
from tests.support import TrackingServer, mlflow_run_main, project_environment, runs_of

LOGGED_MODELS_SEARCH = "/api/2.0/mlflow/logged-models/search"
# More than two pages at Databricks' limit of 50.
OTHER_MODELS = 120


def _experiment(client: MlflowClient, purpose: str) -> str:
    return client.create_experiment(f"{purpose}-{uuid.uuid4().hex[:8]}")


def _other_models(client: MlflowClient, experiment_id: str, count: int = OTHER_MODELS) -> None:
    """LoggedModels without files, left PENDING as another pipeline's models might be."""
    for number in range(count):
        client.create_logged_model(experiment_id, name=f"other-{number}")


def _refused(search, **arguments) -> MlflowException:
    with pytest.raises(MlflowException) as caught:
        search(**arguments)
    return caught.value


@pytest.mark.parametrize(
    ("path", "search"),
    [
        (LOGGED_MODELS_SEARCH,
         lambda client, ids, n: client.search_logged_models(experiment_ids=ids, max_results=n)),
        ("/api/2.0/mlflow/runs/search",
         lambda client, ids, n: client.search_runs(ids, max_results=n)),
        ("/api/2.0/mlflow/experiments/search",
         lambda client, ids, n: client.search_experiments(max_results=n)),
        ("/api/2.0/mlflow/model-versions/search",
         lambda client, ids, n: client.search_model_versions(max_results=n)),
        ("/api/2.0/mlflow/registered-models/search",
         lambda client, ids, n: client.search_registered_models(max_results=n)),
    ],
)  # fmt: skip
def test_the_double_refuses_a_search_above_its_documented_limit(
    tracking_server: TrackingServer, path, search
):
    limit = SEARCH_LIMITS[path]
    with databricks_double(tracking_server.uri) as (uri, seen):
        client = MlflowClient(tracking_uri=uri)
        ids = [_experiment(client, "limits")]
        search(client, ids, limit)  # at the limit: passed on and answered
        error = _refused(search, client=client, ids=ids, n=limit + 1)
    assert error.error_code == "INVALID_PARAMETER_VALUE"
    assert f"max_results must be at most {limit}, got {limit + 1}" in error.message
    # Refused by the double, not by the client before sending.
    assert calls_by_path(seen)[f"{seen[-1].split()[0]} {path}"] == 2


def test_the_search_main_made_at_every_start_dies_on_databricks_and_paging_does_not(
    tracking_server: TrackingServer,
):
    with databricks_double(tracking_server.uri) as (uri, seen):
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment(client, "old-start-up")
        _other_models(client, experiment_id)
        # What pending_models sent before it paged: main died with this before any step ran.
        error = _refused(client.search_logged_models, experiment_ids=[experiment_id],
                         max_results=1000)  # fmt: skip
        assert error.error_code == "INVALID_PARAMETER_VALUE"
        seen.clear()
        assert len(pending_models(client, experiment_id)) == OTHER_MODELS
    assert calls_by_path(seen) == {f"POST {LOGGED_MODELS_SEARCH}": 3}


def _run_left_logging(client: MlflowClient, experiment_id: str, status: str) -> tuple[str, str]:
    """A run marked as logging a model, with that model PENDING, ended with ``status``."""
    run_id = client.create_run(experiment_id).info.run_id
    client.set_tag(run_id, LOGGING_MODEL_TAG, "true")
    model = client.create_logged_model(experiment_id, source_run_id=run_id, name="chat_model")
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id, model.model_id


def test_abandoned_models_are_found_from_the_runs_left_logging_not_by_a_scan(
    tracking_server: TrackingServer,
):
    with databricks_double(tracking_server.uri) as (uri, seen):
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment(client, "abandoned")
        killed_run, abandoned = _run_left_logging(client, experiment_id, "FAILED")
        still_logging, in_progress = _run_left_logging(client, experiment_id, "RUNNING")
        _other_models(client, experiment_id)
        seen.clear()

        assert fail_abandoned_models(client, experiment_id) == [abandoned]
        calls = calls_by_path(seen)
        assert client.get_logged_model(abandoned).status == LoggedModelStatus.FAILED
        # A run still running may still finish its model; the others are not its business.
        assert client.get_logged_model(in_progress).status == LoggedModelStatus.PENDING
        assert len(pending_models(client, experiment_id)) == OTHER_MODELS + 1
        assert LOGGING_MODEL_TAG not in client.get_run(killed_run).data.tags
        assert LOGGING_MODEL_TAG in client.get_run(still_logging).data.tags
        # One search for the marked runs, one for the ended run's models: none of the 120.
        assert calls[f"POST {LOGGED_MODELS_SEARCH}"] == 1
        assert calls["POST /api/2.0/mlflow/runs/search"] == 1
        # Cleaned once: the next start finds nothing to do.
        assert fail_abandoned_models(client, experiment_id) == []


def _uc_name() -> str:
    return f"main.default.double_{uuid.uuid4().hex[:8]}"


def test_unity_catalog_mode_refuses_two_level_names_and_stages(tracking_server: TrackingServer):
    name = _uc_name()
    with databricks_double(tracking_server.uri, UnityCatalog()) as (uri, _):
        client = MlflowClient(tracking_uri=uri)
        two_levels = _refused(client.create_registered_model, name="default.chat_model")
        no_catalog = _refused(client.create_registered_model, name="hive.default.chat_model")
        client.create_registered_model(name)  # three levels, in a catalog the double holds
        # MLflow warns that stages are deprecated; Unity Catalog has none.
        with pytest.deprecated_call():
            transition = _refused(client.transition_model_version_stage, name=name, version="1",
                                  stage="Production")  # fmt: skip
        with pytest.deprecated_call():
            by_stage = _refused(client.get_latest_versions, name=name, stages=["Production"])
    assert two_levels.error_code == "INVALID_PARAMETER_VALUE"
    assert "specify all three levels" in two_levels.message
    assert no_catalog.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert "Catalog 'hive' does not exist" in no_catalog.message
    for refused, method in ((transition, "transition_model_version_stage"),
                            (by_stage, "get_latest_versions")):  # fmt: skip
        assert refused.error_code == "INVALID_PARAMETER_VALUE"
        unsupported = f"Method '{method}' is unsupported for models in the Unity Catalog"
        assert unsupported in refused.message
    # The real server behind it takes what Unity Catalog refuses: the double is what refuses.
    real = MlflowClient(tracking_uri=tracking_server.uri)
    real.create_registered_model(f"default-{uuid.uuid4().hex[:8]}")
    with pytest.deprecated_call():
        assert real.get_latest_versions(name, stages=["Production"]) == []


@pytest.mark.parametrize(
    ("workspace", "expected"),
    [
        # A workspace where Unity Catalog was enabled automatically: its catalog is its own name.
        (UnityCatalog(catalogs={"adb_1234567890": {"default"}}),
         "Unity Catalog has no catalog 'main'"),
        (UnityCatalog(read_only=True), "GRANT CREATE MODEL ON SCHEMA main.default"),
    ],
    ids=["missing-catalog", "read-only-registry"],
)  # fmt: skip
def test_main_refuses_a_registry_it_cannot_write_within_the_first_minute(
    tracking_server: TrackingServer, tmp_path, workspace, expected
):
    experiment = f"preflight-{uuid.uuid4().hex[:8]}"
    name = _uc_name()
    with databricks_double(tracking_server.uri, workspace) as (uri, seen):
        began = time.monotonic()
        completed = mlflow_run_main(
            tmp_path, "model=tiny-random-phi3",
            f"overrides=register=unity-catalog register.registered_model_name={name}",
            MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=experiment,
            # What a user exports for MLflow's databricks-uc registry.
            DATABRICKS_HOST=uri, DATABRICKS_TOKEN="dapi-test",
        )  # fmt: skip
        elapsed = time.monotonic() - began
    print(f"\n{workspace}: `mlflow run . -e main` refused after {elapsed:.1f} s")
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, completed.stderr[-4000:]
    assert expected in errors[0]
    assert completed.returncode != 0
    assert elapsed < 60  # the promise: fail in the first minute
    client = MlflowClient(tracking_uri=tracking_server.uri)
    (main,) = runs_of(client, experiment, "main")
    assert main.info.status == "FAILED"
    assert expected in main.data.tags[ERROR_TAG]
    # Refused before any step run was created.
    runs = client.search_runs([main.info.experiment_id], max_results=5)
    assert [run.info.run_id for run in runs] == [main.info.run_id]
    assert any("/api/2.1/unity-catalog/catalogs/main" in line for line in seen)


def _project_snapshot(folder: Path) -> Path:
    """A copy of the project's files as they are now (tracked, and untracked but not ignored),
    outside git. A warm start reuses runs of the same code version, which changes with any edit
    to the code; run from a copy, the cold and warm runs compare the same code even while the
    working tree is being edited (outside git, the version is a hash of the copied code)."""
    listed = subprocess.run(
        ["git", "-C", str(PROJECT_DIR), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True, check=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for relative in filter(None, listed):
        source = PROJECT_DIR / relative
        if source.is_file():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / relative)
    return folder


def _mlflow_run_main_of(project: Path, working_dir: Path, *parameters: str, **environment: str):
    """`mlflow run <project> -e main --env-manager local -P ...`, as `mlflow_run_main` runs it
    for the working tree."""
    command = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "main",
               "--env-manager", "local"]  # fmt: skip
    for parameter in parameters:
        command += ["-P", parameter]
    return subprocess.run(command, cwd=working_dir, env=project_environment(**environment),
                          capture_output=True, text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
def test_the_pipeline_runs_in_unity_catalog_mode_cold_and_warm(
    tracking_server: TrackingServer, tmp_path
):
    experiment = f"unity-catalog-{uuid.uuid4().hex[:8]}"
    name = _uc_name()
    # register writes through the tracking server's registry with a three-level name, and the
    # double applies Unity Catalog's rules there (why not databricks-uc: the double's docstring).
    parameters = ("model=tiny-random-phi3",
                  f"overrides=evaluate.limit=4 register.registered_model_name={name}")  # fmt: skip
    project = _project_snapshot(tmp_path / "project")
    working_dir = tmp_path / "work"
    working_dir.mkdir()
    with databricks_double(tracking_server.uri, UnityCatalog()) as (uri, seen):
        environment = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}
        client = MlflowClient(tracking_uri=uri)

        def warm_start() -> dict[str, int]:
            seen.clear()
            completed = _mlflow_run_main_of(project, working_dir, *parameters, **environment)
            assert completed.returncode == 0, completed.stderr[-4000:]
            reused = runs_of(client, experiment, "main")[0].data.tags[STEPS_REUSED_TAG]
            assert set(reused.split(",")) == set(step_names())
            return calls_by_path(seen)

        cold = _mlflow_run_main_of(project, working_dir, *parameters, **environment)
        assert cold.returncode == 0, cold.stderr[-4000:]
        register = runs_of(client, experiment, "register")[0].data.tags
        assert register[REGISTRATION_STATUS_TAG] == "registered"
        version = register[REGISTERED_VERSION_TAG]
        # What the pipeline left, as Unity Catalog shows it.
        # Both candidates pass on the tiny model: the champion's and the challenger's versions.
        searched = {v.version: v for v in client.search_model_versions(f"name = '{name}'")}
        got = client.get_model_version(name, version)
        aliases = client.get_registered_model(name).aliases
        without_models = warm_start()
        _other_models(client, client.get_experiment_by_name(experiment).experiment_id)
        with_models = warm_start()
    assert version in searched
    for found in searched.values():
        assert found.source.startswith("s3://") and not found.model_id
        assert found.aliases == [] and found.tags == {}
    assert got.aliases == ["champion"] and got.tags and not got.current_stage
    assert aliases["champion"] == version
    # The real server behind the double gives that version a stage: the double took it away.
    assert MlflowClient(tracking_uri=tracking_server.uri).get_model_version(
        name, version).current_stage == "None"  # fmt: skip
    print(f"warm start calls: {sum(without_models.values())} with 0 other LoggedModels, "
          f"{sum(with_models.values())} with {OTHER_MODELS}: {with_models}")  # fmt: skip
    assert with_models == without_models


@pytest.mark.slow
def test_a_log_step_that_finishes_leaves_no_mark_and_no_pending_model(logged_models_tracking):
    client, runs = logged_models_tracking
    for step in ("log_transformers", "log_onnx"):
        run = client.get_run(runs[step])
        assert LOGGING_MODEL_TAG not in run.data.tags, step
        assert pending_models(client, runs["experiment_id"], source_run_id=run.info.run_id) == []
    assert runs_left_logging(client, runs["experiment_id"]) == []

"""The pipeline's searches through a double that enforces Databricks' documented search limits
(tests/databricks_double.py): the double refuses what Databricks refuses, the search main made at
every start before it paged would have died there, and the abandoned-model cleanup neither
breaks the limits nor costs more calls when the experiment holds more LoggedModels."""

from __future__ import annotations

import uuid

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from llm_packager.keys import LOGGING_MODEL_TAG, STEPS_REUSED_TAG
from llm_packager.models.model_store import (
    fail_abandoned_models,
    pending_models,
    runs_left_logging,
)
from tests.databricks_double import SEARCH_LIMITS, calls_by_path, databricks_double
from tests.support import TrackingServer, mlflow_run_main, runs_of

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


@pytest.mark.slow
def test_a_warm_start_costs_the_same_calls_with_120_other_logged_models(
    tracking_server: TrackingServer, tmp_path
):
    experiment = f"warm-start-{uuid.uuid4().hex[:8]}"
    with databricks_double(tracking_server.uri) as (uri, seen):
        environment = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}
        client = MlflowClient(tracking_uri=uri)

        def warm_start() -> dict[str, int]:
            seen.clear()
            completed = mlflow_run_main(tmp_path, "model=tiny-random-phi3", "steps=fetch_model",
                                        **environment)  # fmt: skip
            assert completed.returncode == 0, completed.stderr[-4000:]
            assert runs_of(client, experiment, "main")[0].data.tags[STEPS_REUSED_TAG] == (
                "fetch_model"
            )
            return calls_by_path(seen)

        cold = mlflow_run_main(tmp_path, "model=tiny-random-phi3", "steps=fetch_model",
                               **environment)  # fmt: skip
        assert cold.returncode == 0, cold.stderr[-4000:]
        without_models = warm_start()
        _other_models(client, client.get_experiment_by_name(experiment).experiment_id)
        with_models = warm_start()
    assert with_models == without_models
    print(f"a warm start's tracking-server calls: {sum(with_models.values())}: {with_models}")


@pytest.mark.slow
def test_a_log_step_that_finishes_leaves_no_mark_and_no_pending_model(logged_models_tracking):
    client, runs = logged_models_tracking
    for step in ("log_transformers", "log_onnx"):
        run = client.get_run(runs[step])
        assert LOGGING_MODEL_TAG not in run.data.tags, step
        assert pending_models(client, runs["experiment_id"], source_run_id=run.info.run_id) == []
    assert runs_left_logging(client, runs["experiment_id"]) == []

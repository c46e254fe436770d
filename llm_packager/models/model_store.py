"""Where a log step puts its model: a LoggedModel, or plain run artifacts.

MLflow 3's ``log_model`` always creates a LoggedModel through ``/api/2.0/mlflow/logged-models``.
Some tracking servers have no such API: Azure ML's answers 404 to every call under it. There the
log steps save the model locally and log the folder as run artifacts under a fixed path
(``chat_model``), and hand on ``runs:/<run id>/chat_model``, which ``mlflow.pyfunc.load_model``
loads and ``mlflow.register_model`` registers like any model. ``tracking.logged_models: auto``
asks the server once, before any step runs.

Every search of the pipeline pages here (`all_pages`): a server may refuse a ``max_results`` above
its documented maximum outright (Databricks answers ``400 INVALID_PARAMETER_VALUE``) instead of
returning fewer results, so each search asks for at most the smallest documented maximum of the
servers the pipeline is deployed to and follows the page token; docs/operations.md ("Search limits
and paging") gives the sources.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from llm_packager.choices import LoggedModels, ModelStore
from llm_packager.keys import LOGGING_MODEL_TAG, MODEL_ARTIFACT_PATH, MODEL_STORE_TAG

logger = logging.getLogger(__name__)

# Databricks, Search Logged Models: "The maximum limit is 50".
LOGGED_MODELS_PAGE_SIZE = 50
# Databricks, Search Runs: "Max threshold is 50000"; MLflow's default page (1000) is well within.
RUNS_PAGE_SIZE = 1000
# Databricks, Search Model Versions: at most 10000; Unity Catalog lists at most 1000 a page.
MODEL_VERSIONS_PAGE_SIZE = 1000


def all_pages(search: Callable[..., Any], page_size: int, **arguments: Any) -> Iterator[Any]:
    """Every result of ``search(**arguments)`` (an MlflowClient search method returning a
    PagedList), asking for ``page_size`` at a time and following the page token to the end."""
    token = None
    while True:
        page = search(**arguments, max_results=page_size, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def has_status(run: Any, status: str) -> bool:
    """Whether a run's status is ``status`` (``RUNNING``, ``FINISHED``...), in any casing.

    Every status check of the pipeline compares here, on the run the server returned, never in a
    search filter: Azure ML's tracking server does not support ``attributes.status`` in one, and
    names run statuses differently in its own tools (docs/azureml.md).
    """
    return (run.info.status or "").upper() == status.upper()


def server_has_logged_models(client: MlflowClient, experiment_id: str) -> bool:
    """Ask the tracking server once whether it serves the LoggedModel API.

    Raises:
        MlflowException: any failure other than the API being absent (404).
    """
    try:
        client.search_logged_models(experiment_ids=[experiment_id], max_results=1)
    except MlflowException as error:
        if error.get_http_status_code() == 404 or error.error_code == "ENDPOINT_NOT_FOUND":
            logger.info("The tracking server has no LoggedModel API (%s)", error.message[:200])
            return False
        raise
    return True


def resolve_model_store(mode: LoggedModels, client: MlflowClient, experiment_id: str) -> ModelStore:
    """The store the log steps use: as configured, or, for ``auto``, as the server allows."""
    if mode == LoggedModels.on:
        return ModelStore.logged_models
    if mode == LoggedModels.off or not server_has_logged_models(client, experiment_id):
        return ModelStore.run_artifacts
    return ModelStore.logged_models


def log_chat_model(flavor: ModuleType, store: ModelStore, run_id: str, **options: Any) -> str:
    """Log a model with ``flavor`` (``mlflow.transformers``, ``mlflow.pyfunc``) in ``store``.

    ``options`` are the flavor's ``log_model``/``save_model`` arguments, less the name or path.

    Returns:
        The model's URI: ``models:/<id>`` or ``runs:/<run id>/chat_model``.
    """
    if store == ModelStore.logged_models:
        # Marked while logging: a run that ends with the mark still set (its process killed
        # mid-upload) left its model PENDING, and the next main finds it by the mark.
        mlflow.set_tags({MODEL_STORE_TAG: store.value, LOGGING_MODEL_TAG: "true"})
        model_uri = flavor.log_model(name=MODEL_ARTIFACT_PATH, **options).model_uri
        MlflowClient().delete_tag(run_id, LOGGING_MODEL_TAG)
        return model_uri
    mlflow.set_tag(MODEL_STORE_TAG, store.value)
    with tempfile.TemporaryDirectory(prefix="chat-model-") as scratch:
        folder = Path(scratch) / MODEL_ARTIFACT_PATH
        flavor.save_model(path=str(folder), **options)
        mlflow.log_artifacts(str(folder), MODEL_ARTIFACT_PATH)
    return f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"


def pending_models(client: MlflowClient, experiment_id: str,
                   source_run_id: str | None = None) -> list:  # fmt: skip
    """The experiment's LoggedModels still PENDING (logging started, never finished), only those
    ``source_run_id`` logged if given, searched a page at a time within the server's limit."""
    # Status is filtered here, not by the server: MLflow 3.17's SQL store compares the filter's
    # status name ('PENDING') with the integer it stores, so `status = 'PENDING'` matches nothing.
    query = f"source_run_id = '{source_run_id}'" if source_run_id else None
    models = all_pages(client.search_logged_models, LOGGED_MODELS_PAGE_SIZE,
                       experiment_ids=[experiment_id], filter_string=query)  # fmt: skip
    return [model for model in models if model.status == LoggedModelStatus.PENDING]


def runs_left_logging(client: MlflowClient, experiment_id: str) -> list:
    """The runs that ended while logging a LoggedModel: `log_chat_model` marks a run before it
    logs and unmarks it once the model is logged, so only these may hold a model left PENDING.

    Found by that mark, not by scanning the experiment's models: the search returns only the
    runs that need cleaning, however many models the experiment holds.
    """
    marked = all_pages(client.search_runs, RUNS_PAGE_SIZE, experiment_ids=[experiment_id],
                       filter_string=f"tags.`{LOGGING_MODEL_TAG}` = 'true'")  # fmt: skip
    return [run for run in marked if not has_status(run, "RUNNING")]


def fail_abandoned_models(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the LoggedModels left PENDING by a run that ended (a step killed while it was
    logging): nothing would ever finish them, and no step uses a model that is not READY.

    Runs left RUNNING by a process that is gone must be ended first (``fail_orphaned_runs``);
    a run still RUNNING may still finish its model.
    """
    abandoned = []
    for run in runs_left_logging(client, experiment_id):
        run_id = run.info.run_id
        for model in pending_models(client, experiment_id, source_run_id=run_id):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            abandoned.append(model.model_id)
            logger.warning("Marked LoggedModel %s FAILED: its run %s ended before it was "
                           "logged", model.model_id, run_id)  # fmt: skip
        client.delete_tag(run_id, LOGGING_MODEL_TAG)
    return abandoned

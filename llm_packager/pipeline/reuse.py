"""Finding a finished step run that can stand in for a new one (docs/architecture.md, "Reusing
step runs"), and the tags by which a step announces what it produced.

A step run is reusable when it FINISHED, has the same entry point, the same normalised parameters
(defaults included), the same code version and the same upstream runs, and the outputs it
announced still exist. The first four are folded into one key, tagged on the run by `main` once
the step has succeeded, and found with a `search_runs` filter; the outputs are checked on the
candidates, newest first.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from urllib.parse import urlparse

from mlflow.entities import LoggedModelStatus, Run
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from llm_packager.keys import (
    CANDIDATE_TAG,
    MODEL_OUTPUT,
    MODEL_URI_TAG,
    OUTPUTS_TAG,
    REUSE_KEY_TAG,
    RUNTIME_TAG,
)
from llm_packager.models.model_store import RUNS_PAGE_SIZE, all_pages, has_status

_CANDIDATES_CHECKED = 20


def reuse_key(
    entry_point: str,
    parameters: dict[str, str],
    code_version: str,
    upstream_run_ids: dict[str, str],
) -> str:
    """Hash everything that decides what a step run produces."""
    payload = {
        "entry_point": entry_point,
        "parameters": parameters,
        "code_version": code_version,
        "upstream_run_ids": upstream_run_ids,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def announce_outputs(client: MlflowClient, run_id: str, outputs: dict[str, str]) -> None:
    """Record on a run the URIs of what it produced (``runs:/`` artifacts or ``models:/``)."""
    client.set_tag(run_id, OUTPUTS_TAG, json.dumps(outputs, sort_keys=True))


def announce_model(client: MlflowClient, run_id: str, model_uri: str) -> None:
    """Record the ``models:/<id>`` URI of the model a step logged, as its one output."""
    client.set_tag(run_id, MODEL_URI_TAG, model_uri)
    announce_outputs(client, run_id, {MODEL_OUTPUT: model_uri})


def candidate_tags(candidate: str, runtime: str) -> dict[str, str]:
    """The tags that name a log step's model among the evaluated candidates, and the name of the
    runtime that runs it."""
    return {CANDIDATE_TAG: candidate, RUNTIME_TAG: runtime}


def announced_outputs(run: Run) -> dict[str, str]:
    """The outputs a run announced, or an empty dict if it announced none."""
    raw = run.data.tags.get(OUTPUTS_TAG)
    return json.loads(raw) if raw else {}


def _artifact_exists(client: MlflowClient, run_id: str, path: str) -> bool:
    # The run's own artifact repository, not MlflowClient.list_artifacts: for a path below the
    # root, MLflow 3 also searches the run's LoggedModels, which a server without that API
    # (Azure ML's) answers with 404.
    repository = get_artifact_repository(
        client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri
    )
    parent = posixpath.dirname(path) or None
    match = next((info for info in repository.list_artifacts(parent) if info.path == path), None)
    if match is None:
        return False
    return not match.is_dir or bool(repository.list_artifacts(path))


def output_exists(client: MlflowClient, uri: str) -> bool:
    """True if an announced ``runs:/<id>/<path>`` artifact, ``models:/<id>`` LoggedModel or
    ``models:/<name>/<version>`` registered version exists (and the models are READY)."""
    parsed = urlparse(uri)
    # "runs:/<id>/path" and "models:/<id>" parse with an empty netloc: the id leads the path.
    location = (parsed.netloc + parsed.path).lstrip("/")
    try:
        if parsed.scheme == "runs":
            run_id, _, path = location.partition("/")
            return _artifact_exists(client, run_id, path)
        if parsed.scheme == "models" and "/" in location:
            name, _, version = location.rpartition("/")
            return client.get_model_version(name, version).status == "READY"
        if parsed.scheme == "models":
            return client.get_logged_model(location).status == LoggedModelStatus.READY
    except MlflowException:
        return False
    return False


def outputs_exist(client: MlflowClient, run: Run) -> bool:
    """True if the run announced outputs and every one of them still exists."""
    outputs = announced_outputs(run)
    return bool(outputs) and all(output_exists(client, uri) for uri in outputs.values())


def find_reusable_run(client: MlflowClient, experiment_id: str, key: str) -> Run | None:
    """The newest FINISHED run with this reuse key whose announced outputs all still exist.

    The server is asked for the key only, and the status is compared here, in any casing: Azure
    ML's tracking server does not support ``attributes.status`` in a filter (docs/azureml.md).
    """
    with_key = all_pages(
        client.search_runs, RUNS_PAGE_SIZE, experiment_ids=[experiment_id],
        filter_string=f"tags.`{REUSE_KEY_TAG}` = '{key}'",
    )  # fmt: skip
    finished = [run for run in with_key if has_status(run, "FINISHED")]
    finished.sort(key=lambda run: run.info.start_time or 0, reverse=True)
    return next((run for run in finished[:_CANDIDATES_CHECKED] if outputs_exist(client, run)), None)

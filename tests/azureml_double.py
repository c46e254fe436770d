"""An Azure ML workspace tracking server double: a loopback proxy in front of a real `mlflow server`
that answers as Azure ML's MLflow endpoint does where that differs from open-source MLflow, and
hands a job the variables Azure ML injects into it.

What it enforces, each with its source:

- **No LoggedModel API.** Every call under ``/api/2.0/mlflow/logged-models`` gets ``404`` with an
  HTML body, as Azure ML's server answers MLflow 3's LoggedModel calls
  (Azure/azure-sdk-for-python#44896). MLflow's client raises that as ``ENDPOINT_NOT_FOUND``.
- **No registered model aliases.** azureml-mlflow 1.62.0.post6 (the version
  ``requirements-azureml.txt`` pins) implements no alias call of its own: its registry store,
  the class ``AzureMLflowModelRegistry`` in its ``_store.model_registry`` package, subclasses
  MLflow's REST store and overrides only ``create_model_version``, so
  ``set_registered_model_alias``, ``delete_registered_model_alias`` and
  ``get_model_version_by_alias`` go to the workspace as MLflow's plain REST calls
  (``/api/2.0/mlflow/registered-models/alias``). Microsoft's support matrix for managing models
  with MLflow (MicrosoftDocs/azure-docs, articles/machine-learning/how-to-manage-models-mlflow.md,
  "Support matrix for managing models with MLflow") lists stages, tags and descriptions, and no
  aliases. What the workspace answers there is not published; the double **assumes** it answers
  as it does for the LoggedModel API it also lacks: ``404`` with an HTML body (so MLflow raises
  ``ENDPOINT_NOT_FOUND``), and registered models and versions come back without ``aliases``.
  ``aliases=True`` turns the endpoint on for a test of the other branch.
- **Run status in search filters.** Microsoft's "Query & compare experiments and runs with
  MLflow" (MicrosoftDocs/azure-docs, articles/machine-learning/how-to-track-experiments-mlflow.md,
  "Filter runs by status") maps Azure ML's job statuses (Not started, Queued, Preparing, Running,
  Completed, Failed, Canceled) to MLflow's ``attributes.status`` values (``SCHEDULED``,
  ``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``) and warns: "Expressions containing
  ``attributes.status`` in the parameter ``filter_string`` are not support at the moment. Please
  use Pandas filtering expressions". Runs therefore come back with MLflow's status names (MLflow's
  client could not read any other: its JSON parser drops an unknown enum name, and the run would
  read as RUNNING), and the job statuses ``Completed``/``Running`` are what Studio shows, never
  what a search returns. How the server fails such a filter is not published; the double is
  strict and refuses any run search whose filter names the status, in any casing, with ``400
  INVALID_PARAMETER_VALUE``: a search that relies on it fails here, whatever Azure really does.
- **The job's own run and token.** Azure ML creates the job's MLflow run before the job starts
  and injects ``MLFLOW_TRACKING_URI``, ``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_ID`` and
  ``MLFLOW_TRACKING_TOKEN`` into its process, overriding values the job sets itself
  (Azure/azure-sdk-for-python#38813; zenml-io/zenml#4407, whose fix clears them before using
  another server). `start_job` creates that run and gives the environment; the double then
  refuses (``401``) any request without that bearer token, as the workspace refuses an
  unauthenticated call.

Everything else passes through to the real server unchanged; every request, headers included,
is kept in ``received``.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse

from mlflow.tracking import MlflowClient

from .loopback_proxy import LOGGED_MODELS_PREFIX, ProxyRequest, reverse_proxy

ALIAS_PATH = "/api/2.0/mlflow/registered-models/alias"
RUNS_SEARCH_PATH = "/api/2.0/mlflow/runs/search"
_REGISTRY_PATHS = ("/api/2.0/mlflow/registered-models/", "/api/2.0/mlflow/model-versions/")
# The run's status named in a filter: `status`, `attribute.status`, `attributes.status`,
# `attr.status` or `run.status`, compared in any way; never a tag or param that ends in "status".
_STATUS_IN_FILTER = re.compile(
    r"(?<![\w.`])(?:attributes?\.|attr\.|run\.)?status\s*(?:!=|=|\bI?LIKE\b|\bIN\b)", re.I
)


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message}).encode()


def filters_on_status(filter_string: str) -> bool:
    """Whether a run search's filter compares the run's status."""
    return bool(_STATUS_IN_FILTER.search(filter_string or ""))


def _strip_aliases(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip_aliases(v) for k, v in value.items() if k != "aliases"}
    if isinstance(value, list):
        return [_strip_aliases(item) for item in value]
    return value


@dataclass
class AzureWorkspace:
    """The double's URL, the workspace token it requires (None: any), and what it received."""

    uri: str
    token: str | None
    upstream: str
    received: list[ProxyRequest] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def start_job(self, experiment_name: str) -> AzureJob:
        """What Azure ML does before a command job's process starts: create the job's run
        (RUNNING) in its experiment, and hand the process the variables it injects."""
        client = MlflowClient(tracking_uri=self.upstream)
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        )
        run = client.create_run(experiment_id, tags={"mlflow.source.type": "JOB"})
        return AzureJob(self, run.info.run_id, experiment_id)

    def requests_with_token(self, token: str) -> list[ProxyRequest]:
        """The requests that carried ``Authorization: Bearer <token>``."""
        return [r for r in self.received if _bearer(r) == token]


@dataclass(frozen=True)
class AzureJob:
    """A job's run, created by Azure ML before the job starts, and what its process sees."""

    workspace: AzureWorkspace
    run_id: str
    experiment_id: str

    def environment(self) -> dict[str, str]:
        """The MLflow variables Azure ML injects into the job's process."""
        return {
            "MLFLOW_TRACKING_URI": self.workspace.uri,
            "MLFLOW_RUN_ID": self.run_id,
            "MLFLOW_EXPERIMENT_ID": self.experiment_id,
            "MLFLOW_TRACKING_TOKEN": self.workspace.token or "azure-workspace-token",
        }

    def end(self, exit_code: int) -> None:
        """What Azure ML does once the job's process exits: it ends the job's run (azureml-mlflow
        skips the job's own status updates, ``AzureMLRestStore.update_run_info``)."""
        status = "FINISHED" if exit_code == 0 else "FAILED"
        MlflowClient(tracking_uri=self.workspace.upstream).set_terminated(self.run_id, status)


def _bearer(request: ProxyRequest) -> str | None:
    header = next((v for k, v in request.headers.items() if k.lower() == "authorization"), "")
    return header[len("Bearer ") :] if header.startswith("Bearer ") else None


def _answer(workspace: AzureWorkspace, aliases: bool):
    def answer(request: ProxyRequest) -> tuple[int, bytes] | None:
        path = urlparse(request.path).path
        if workspace.token is not None and _bearer(request) != workspace.token:
            return _error(401, "UNAUTHENTICATED", "The workspace token is missing or wrong")
        if path == ALIAS_PATH and not aliases:
            return 404, b"<html><body><h1>404 Not Found</h1></body></html>"
        if path == RUNS_SEARCH_PATH:
            query = json.loads(request.body or b"{}").get("filter", "")
            if filters_on_status(query):
                return _error(400, "INVALID_PARAMETER_VALUE",
                              f"Filtering runs by status is not supported: {query}")  # fmt: skip
        return None

    return answer


def _rewrite(aliases: bool):
    def rewrite(request: ProxyRequest, status: int, body: bytes) -> bytes:
        path = urlparse(request.path).path
        if aliases or status != 200 or not path.startswith(_REGISTRY_PATHS):
            return body
        return json.dumps(_strip_aliases(json.loads(body or b"{}"))).encode()

    return rewrite


@contextmanager
def azureml_double(
    target: str, *, token: str | None = None, aliases: bool = False
) -> Iterator[AzureWorkspace]:
    """Serve the double in front of the tracking server at ``target``. ``token``: the workspace
    token every request must carry (``secrets.token_hex`` if "generate"; None: not checked)."""
    token = secrets.token_hex(16) if token == "generate" else token
    workspace = AzureWorkspace("", token, target)
    proxy = reverse_proxy(
        target,
        refused=(LOGGED_MODELS_PREFIX,),
        answer=_answer(workspace, aliases),
        rewrite=_rewrite(aliases),
        received=workspace.received,
    )
    with proxy as (uri, seen):
        workspace.uri = uri
        workspace.seen = seen
        yield workspace

"""A Databricks tracking server double: a loopback proxy in front of a real `mlflow server` that
enforces the search limits of Databricks' REST API reference.

A real `mlflow server` accepts a ``max_results`` far above what Databricks accepts (and caps or
ignores the rest), so a search that works in our tests can die on a workspace. The double answers
a search whose ``max_results`` is above the documented maximum of its endpoint with ``400`` and
the JSON error body Databricks sends, ``{"error_code": "INVALID_PARAMETER_VALUE", ...}``, which
MLflow's REST client raises as a ``RestException`` with that error code. Everything else passes
through unchanged, and every request line is recorded, so a test can count the calls.

The limits, each from Databricks' REST API reference (page title and address as stored):

- Search Logged Models, ``POST /api/2.0/mlflow/logged-models/search``: "The maximum limit is 50"
  ("Search Logged Models", https://docs.databricks.com/api/experiments/v1/search-logged-models.md).
- Search Runs, ``POST /api/2.0/mlflow/runs/search``: "Max threshold is 50000"
  ("Search Runs", https://docs.databricks.com/api/experiments/v1/search-runs.md).
- Search Experiments, ``POST /api/2.0/mlflow/experiments/search``: "Max threshold is 3000"
  ("Search Experiments", https://docs.databricks.com/api/experiments/v1/search-experiments.md).
- Search Model Versions (workspace registry), ``GET /api/2.0/mlflow/model-versions/search``:
  "Max threshold is 10K", constraint ``<= 10000``
  ("Search Model Versions", https://docs.databricks.com/api/model-registry/v1/search-model-versions.md).
- Search Registered Models, ``GET /api/2.0/mlflow/registered-models/search``: "Max threshold is
  1000" ("Search Registered Models",
  https://docs.databricks.com/api/model-registry/v1/search-registered-models.md).

Not found: the limit of Unity Catalog's model version search as MLflow calls it
(``GET /api/2.0/mlflow/unity-catalog/model-versions/search``) is not in the public reference. The
closest documented endpoint, Unity Catalog's "List" model versions
(https://docs.databricks.com/api/uc-registered-models/v1/list-model-versions.md), does not refuse
a larger value but pages at most 1000 ("the minimum of this value and a server configured value
(1000, as of 1/3/2024)"). The double refuses above 1000 there: stricter than documented, so that
the pipeline's searches stay within the one figure Databricks does publish for it.

MLflow's REST client sends a GET search's fields as the query string and a POST search's as a
JSON body (``mlflow.utils.rest_utils.call_endpoint``); the double reads ``max_results`` from
either. A request without ``max_results`` gets the server's default, which is within the limit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlparse

from .loopback_proxy import ProxyRequest, reverse_proxy

SEARCH_LIMITS = {
    "/api/2.0/mlflow/logged-models/search": 50,
    "/api/2.0/mlflow/runs/search": 50000,
    "/api/2.0/mlflow/experiments/search": 3000,
    "/api/2.0/mlflow/model-versions/search": 10000,
    "/api/2.0/mlflow/registered-models/search": 1000,
    "/api/2.0/mlflow/unity-catalog/model-versions/search": 1000,
}

# A run's id (32 hex digits) or a LoggedModel's (m- and 32 hex digits).
_ID_IN_PATH = re.compile(r"\b(m-)?[0-9a-f]{32}\b")


def _max_results(method: str, path: str, body: bytes | None) -> int | None:
    if method == "GET":
        values = parse_qs(urlparse(path).query).get("max_results")
        return int(values[0]) if values else None
    value = json.loads(body or b"{}").get("max_results")
    # A proto int64 may travel as a JSON string.
    return None if value is None else int(value)


def enforce_search_limits(request: ProxyRequest) -> tuple[int, bytes] | None:
    """Databricks' answer to a search above its endpoint's limit; None to pass the request on."""
    limit = SEARCH_LIMITS.get(urlparse(request.path).path)
    if limit is None:
        return None
    asked = _max_results(request.method, request.path, request.body)
    if asked is None or asked <= limit:
        return None
    error = {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": f"max_results must be at most {limit}, got {asked}",
    }
    return 400, json.dumps(error).encode()


@contextmanager
def databricks_double(target: str) -> Iterator[tuple[str, list[str]]]:
    """Serve the double in front of the tracking server at ``target``; yield its URL and the
    request lines (``"POST /api/2.0/mlflow/runs/search"``) it has seen so far."""
    with reverse_proxy(target, refused=(), answer=enforce_search_limits) as (uri, seen):
        yield uri, seen


def calls_by_path(seen: list[str]) -> dict[str, int]:
    """How many requests went to each method and path, the query string left out and run or
    model ids in the path (an artifact upload's) replaced by ``<id>``, so two pipelines' calls
    compare."""
    counts: dict[str, int] = {}
    for line in seen:
        method, _, target = line.partition(" ")
        key = f"{method} {_ID_IN_PATH.sub('<id>', urlparse(target).path)}"
        counts[key] = counts.get(key, 0) + 1
    return counts

"""A Databricks tracking server double: a loopback proxy in front of a real `mlflow server` that
enforces the search limits of Databricks' REST API reference and, given a `UnityCatalog`, the rules
of Unity Catalog's model registry.

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

**Unity Catalog mode** (``databricks_double(target, unity_catalog=UnityCatalog(...))``). The
registry rules apply to the workspace registry's endpoints (``/api/2.0/mlflow/registered-models/*``,
``/api/2.0/mlflow/model-versions/*``) and to the two Unity Catalog registry endpoints MLflow's
``databricks-uc`` store calls for get-or-create (``/api/2.0/mlflow/unity-catalog/registered-models/
get|create``), which the double answers itself from the real server's registered-models endpoints.
Why the pipeline registers through the workspace endpoints here: MLflow's real ``databricks-uc``
store uploads a version's files with cloud-storage temporary credentials that UC hands out
(``generate-temporary-model-version-credentials``, then an S3/ADLS/GCS upload:
``mlflow/store/_unity_catalog/registry/rest_store.py``, ``_get_artifact_repo``); no offline double
can give those, so the version files go to the tracking server and UC's rules are applied to the
registry calls around them. The rules, each with its source:

- Three-level names. A registered model is ``catalog.schema.model``: a name with fewer levels is
  refused with ``INVALID_PARAMETER_VALUE`` and a message saying to "specify all three levels",
  the text MLflow's own UC store looks for in UC's answer to add its legacy-registry hint
  (``rest_store.py``, ``create_registered_model``). A catalog or schema the double does not hold
  answers ``404 RESOURCE_DOES_NOT_EXIST`` ("Catalog 'x' does not exist."), as the issue that asked
  for this double states UC's REST API does; MLflow's error codes also define
  ``CATALOG_DOES_NOT_EXIST`` and ``SCHEMA_DOES_NOT_EXIST`` (``mlflow/protos/databricks.proto``),
  which a client must therefore accept too (the preflight does). Not found: a public page showing
  UC's exact body for a missing catalog.
- The catalog and schema GET endpoints, ``GET /api/2.1/unity-catalog/catalogs/{name}`` and
  ``GET /api/2.1/unity-catalog/schemas/{full_name}`` (databricks-sdk 0.156,
  ``databricks.sdk.service.catalog``, ``CatalogsAPI.get`` and ``SchemasAPI.get``: "The caller
  must be a metastore admin, the owner of the catalog, or a user that has the USE_CATALOG
  privilege"; "... or a user that has the USE_SCHEMA privilege on the schema"). The double answers
  them from the catalogs and schemas it holds.
- No stages. MLflow's UC store refuses stage calls before sending anything ("Method
  'transition_model_version_stage' is unsupported for models in the Unity Catalog", and the same
  for ``get_latest_versions``: ``rest_store.py``, ``_raise_unsupported_method``), and UC's REST
  API has no stage endpoint. The double answers the workspace stage endpoints
  (``model-versions/transition-stage``, ``registered-models/get-latest-versions``) for a UC name
  with ``400 INVALID_PARAMETER_VALUE`` and MLflow's text. Not found: what Databricks answers a
  workspace stage call on a UC model; the error code is the double's choice.
- UC-shaped results. A model version search answers what MLflow reads from UC
  (``mlflow/utils/_unity_catalog_utils.py``, ``model_version_search_from_uc_proto``): no
  ``model_id``, no aliases, no tags, and no stage; ``source`` is a storage path (UC copies a
  version's files to the schema's storage location, "File storage for model versions in the
  registered model will be located in the default location which is specified by the parent
  schema": ``RegisteredModelsAPI.create`` in databricks-sdk's ``catalog.py``). A registered model
  search has no aliases or tags (``registered_model_search_from_uc_proto``). A model version or
  registered model got by name keeps its aliases and tags (``model_version_from_uc_proto``) but
  has no stage.
- A read-only registry (``UnityCatalog(read_only=True)``) answers ``403 PERMISSION_DENIED`` to
  every registry write: creating a registered model or a version, setting or deleting an alias or
  a tag, updating, renaming, deleting. Creating a registered model needs "USE_CATALOG ... on the
  parent catalog and the USE_SCHEMA privilege on the parent schema" and "the CREATE MODEL or
  CREATE FUNCTION privilege on the parent schema" (``RegisteredModelsAPI.create``).
- Credentials (``token=``, any mode): a request whose ``Authorization`` is not ``Bearer <token>``
  gets ``403`` with ``{"error_code": "403", "message": "Invalid access token."}``, the body
  Databricks sent in mlflow/mlflow#6734 and databrickslabs/dbx#714 ("Enum ErrorCode has no value
  defined for name '403'"); MLflow now maps that code to ``PERMISSION_DENIED``
  (``mlflow/exceptions.py``, ``RestException``).
- Host discovery: databricks-sdk (which MLflow uses to build ``databricks-uc`` credentials from
  ``DATABRICKS_HOST`` and ``DATABRICKS_TOKEN``) first asks ``GET /.well-known/databricks-config``
  (``databricks.sdk.config``, ``_resolve_host_metadata``), and retries an unanswered host for
  its whole retry budget; the double answers it with an empty configuration, which the SDK accepts.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlencode, urlparse

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

CATALOGS_PATH = "/api/2.1/unity-catalog/catalogs/"
SCHEMAS_PATH = "/api/2.1/unity-catalog/schemas/"
HOST_METADATA_PATH = "/.well-known/databricks-config"
_WORKSPACE_REGISTRY = ("/api/2.0/mlflow/registered-models/", "/api/2.0/mlflow/model-versions/")
_UC_REGISTRY = "/api/2.0/mlflow/unity-catalog/registered-models/"
_STAGE_ENDPOINTS = {
    "/api/2.0/mlflow/model-versions/transition-stage": "transition_model_version_stage",
    "/api/2.0/mlflow/registered-models/get-latest-versions": "get_latest_versions",
}
# Registry endpoints that only read; every other registry call writes.
_REGISTRY_READS = {"get", "search", "get-download-uri", "get-latest-versions", "alias"}
_STORAGE_ROOT = "s3://databricks-double-metastore/models"


@dataclass(frozen=True)
class UnityCatalog:
    """What the double's Unity Catalog holds: each catalog's schemas, and whether the caller may
    write to the registry (a read-only one answers PERMISSION_DENIED to every write)."""

    catalogs: dict[str, set[str]] = field(default_factory=lambda: {"main": {"default"}})
    read_only: bool = False


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message}).encode()


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
    return _error(400, "INVALID_PARAMETER_VALUE",
                  f"max_results must be at most {limit}, got {asked}")  # fmt: skip


def _fields(request: ProxyRequest) -> dict:
    """A request's fields: a GET's query string, any other method's JSON body, as MLflow's REST
    client sends them (``mlflow.utils.rest_utils.call_endpoint``)."""
    if request.method == "GET" or not request.body:
        return {k: v[0] for k, v in parse_qs(urlparse(request.path).query).items()}
    return json.loads(request.body)


def _registered_name(request: ProxyRequest) -> str | None:
    """The registered model a registry request is about, or None (a search by filter)."""
    fields = _fields(request)
    if name := fields.get("name"):
        return name
    # A search names its model in the filter: name = 'catalog.schema.model'.
    match = re.fullmatch(r"\s*name\s*=\s*'([^']*)'\s*", fields.get("filter") or "")
    return match.group(1) if match else None


class _UnityCatalogRules:
    """Unity Catalog's rules on registry requests (see the module docstring for each source)."""

    def __init__(self, catalog: UnityCatalog, upstream: str) -> None:
        self.catalog = catalog
        self.upstream = urlparse(upstream)

    def _missing(self, catalog: str, schema: str | None = None) -> tuple[int, bytes] | None:
        if catalog not in self.catalog.catalogs:
            return _error(404, "RESOURCE_DOES_NOT_EXIST", f"Catalog '{catalog}' does not exist.")
        if schema is not None and schema not in self.catalog.catalogs[catalog]:
            return _error(404, "RESOURCE_DOES_NOT_EXIST",
                          f"Schema '{catalog}.{schema}' does not exist.")  # fmt: skip
        return None

    def catalog_or_schema(self, path: str) -> tuple[int, bytes]:
        if path.startswith(CATALOGS_PATH):
            name = unquote(path.removeprefix(CATALOGS_PATH))
            return self._missing(name) or (200, json.dumps(
                {"name": name, "full_name": name}).encode())  # fmt: skip
        full_name = unquote(path.removeprefix(SCHEMAS_PATH))
        catalog, _, schema = full_name.partition(".")
        found = {"name": schema, "catalog_name": catalog, "full_name": full_name}
        return self._missing(catalog, schema) or (200, json.dumps(found).encode())

    def registry(self, request: ProxyRequest, path: str) -> tuple[int, bytes] | None:
        name = _registered_name(request)
        if name is None:
            return None
        parts = name.split(".")
        if len(parts) != 3 or not all(parts):
            return _error(400, "INVALID_PARAMETER_VALUE",
                          f"Model name '{name}' is invalid: specify all three levels of the "
                          "name (catalog.schema.model) to register in Unity Catalog.")  # fmt: skip
        if method := _STAGE_ENDPOINTS.get(path):
            return _error(400, "INVALID_PARAMETER_VALUE",
                          f"Method '{method}' is unsupported for models in the Unity Catalog. "
                          "Use aliases instead of stages.")  # fmt: skip
        if missing := self._missing(parts[0], parts[1]):
            return missing
        action = path.rsplit("/", 1)[-1]
        writes = action not in _REGISTRY_READS or request.method in ("POST", "DELETE", "PATCH")
        if self.catalog.read_only and writes:
            needed = "CREATE MODEL" if action == "create" else "MODIFY"
            where = f"Schema '{parts[0]}.{parts[1]}'" if action == "create" else (
                f"Registered Model '{name}'")  # fmt: skip
            return _error(403, "PERMISSION_DENIED", f"User does not have {needed} on {where}.")
        if path.startswith(_UC_REGISTRY):
            return self._unity_catalog_endpoint(request, action)
        return None

    def _unity_catalog_endpoint(self, request: ProxyRequest, action: str) -> tuple[int, bytes]:
        """Answer MLflow's UC get or create of a registered model from the real server's
        registry, in the shape of UC's RegisteredModel message."""
        path = f"/api/2.0/mlflow/registered-models/{action}"
        if request.method == "GET":
            path += "?" + urlencode(_fields(request))
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                                timeout=60)  # fmt: skip
        try:
            connection.request(request.method, path, body=request.body,
                               headers={"Content-Type": "application/json"})  # fmt: skip
            response = connection.getresponse()
            status, payload = response.status, response.read()
        finally:
            connection.close()
        if status != 200:
            return status, payload
        model = json.loads(payload).get("registered_model", {})
        kept = ("name", "creation_timestamp", "last_updated_timestamp", "user_id", "description",
                "aliases", "tags")  # fmt: skip
        shaped = {key: model[key] for key in kept if key in model}
        return 200, json.dumps({"registered_model": shaped}).encode()

    def reshape(self, request: ProxyRequest, status: int, payload: bytes) -> bytes:
        """A registry answer as UC gives it: searches without model ids, aliases, tags or
        stages and with a storage path as source; nothing anywhere has a stage."""
        path = urlparse(request.path).path
        if status != 200 or not path.startswith(_WORKSPACE_REGISTRY):
            return payload
        answer = json.loads(payload or b"{}")
        searched = path.endswith("/search")
        for version in answer.get("model_versions", []) + (
            [answer["model_version"]] if "model_version" in answer else []
        ):
            version.pop("current_stage", None)
            if searched:
                for key in ("model_id", "aliases", "tags"):
                    version.pop(key, None)
                storage = f"{_STORAGE_ROOT}/{version['name']}/versions/{version['version']}"
                version["source"] = storage
        for model in answer.get("registered_models", []) + (
            [answer["registered_model"]] if "registered_model" in answer else []
        ):
            model.pop("latest_versions", None)
            if searched:
                model.pop("aliases", None)
                model.pop("tags", None)
        return json.dumps(answer).encode()


def _double_answer(rules: _UnityCatalogRules | None, token: str | None):
    def answer(request: ProxyRequest) -> tuple[int, bytes] | None:
        path = urlparse(request.path).path
        if path == HOST_METADATA_PATH:
            return 200, b"{}"
        if token is not None:
            sent = {k.lower(): v for k, v in request.headers.items()}.get("authorization")
            if sent != f"Bearer {token}":
                return _error(403, "403", "Invalid access token.")
        if refused := enforce_search_limits(request):
            return refused
        if rules is None:
            return None
        if path.startswith((CATALOGS_PATH, SCHEMAS_PATH)):
            return rules.catalog_or_schema(path)
        if path.startswith((*_WORKSPACE_REGISTRY, _UC_REGISTRY)):
            return rules.registry(request, path)
        return None

    return answer


@contextmanager
def databricks_double(
    target: str, unity_catalog: UnityCatalog | None = None, token: str | None = None
) -> Iterator[tuple[str, list[str]]]:
    """Serve the double in front of the tracking server at ``target``; yield its URL and the
    request lines (``"POST /api/2.0/mlflow/runs/search"``) it has seen so far. With
    ``unity_catalog``, the registry follows Unity Catalog's rules; with ``token``, only requests
    carrying it are answered."""
    rules = _UnityCatalogRules(unity_catalog, target) if unity_catalog else None
    with reverse_proxy(
        target, refused=(), answer=_double_answer(rules, token),
        rewrite=rules.reshape if rules else None,
    ) as (uri, seen):  # fmt: skip
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

"""Which names and aliases a Model Registry accepts, checked before anything is registered.

Unity Catalog (registry URI ``databricks-uc``, or ``databricks-uc://<profile>``) keeps models in a
schema: a registered model is named ``catalog.schema.model``, each part made of letters, digits and
underscores, and versions are found by alias, never by stage (UC has no stages). The workspace and
open-source registries take a plain name. Every registry refuses the alias ``latest`` and aliases
shaped like version numbers (``v1``), which would be ambiguous in ``models:/<name>@<alias>``.

A registry without aliases (Azure ML's workspace registry: its support matrix lists stages and
tags, not aliases, and azureml-mlflow adds none; docs/azureml.md) answers the alias endpoint
``404 ENDPOINT_NOT_FOUND``. There `set_alias` tags the version instead (``alias.<alias>``,
`llm_packager.keys.alias_tag_key`, valued with the time it moved) and takes the tag off every
other version, so the tag means what the alias would; `version_by_alias` and `alias_model_uri`
resolve either. Lack of support is told by the error, never by the platform's name.
"""

from __future__ import annotations

import re
import time

from mlflow.exceptions import MlflowException

from llm_packager.errors import UserError
from llm_packager.keys import alias_tag_key
from llm_packager.models.model_store import MODEL_VERSIONS_PAGE_SIZE, all_pages

UNITY_CATALOG_SCHEME = "databricks-uc"
_UC_PART = re.compile(r"[A-Za-z0-9_]+")
_ALIAS = re.compile(r"[\w-]+")
_VERSION_LIKE = re.compile(r"[vV]\d+")


class RegistryNameError(UserError, ValueError):
    """A registered model name or alias the target registry would refuse."""


def is_unity_catalog(registry_uri: str) -> bool:
    """Whether models are registered to Unity Catalog."""
    return registry_uri == UNITY_CATALOG_SCHEME or registry_uri.startswith(
        f"{UNITY_CATALOG_SCHEME}://"
    )


def check_registered_model_name(name: str, registry_uri: str) -> None:
    """Refuse a name the registry at ``registry_uri`` would not take, saying how to fix it.

    Raises:
        RegistryNameError: for an empty name; for Unity Catalog, a name that is not three
            non-empty dot-separated parts of letters, digits and underscores.
    """
    if not name.strip():
        raise RegistryNameError("The registered model name must not be empty")
    if not is_unity_catalog(registry_uri):
        return
    parts = name.split(".")
    if len(parts) != 3 or not all(parts):
        raise RegistryNameError(
            f"Unity Catalog needs a three-level name catalog.schema.model; got '{name}'. "
            f"Set register.registered_model_name, e.g. main.default.{_uc_safe(parts[-1])}"
        )
    for part in parts:
        if not _UC_PART.fullmatch(part):
            raise RegistryNameError(
                f"'{part}' in '{name}' may hold only letters, digits and underscores in "
                f"Unity Catalog; e.g. '{_uc_safe(part)}'"
            )


def check_alias(alias: str) -> None:
    """Refuse an alias that no MLflow registry accepts.

    Raises:
        RegistryNameError: for an empty alias, ``latest``, a version-like alias such as ``v2``, or
            characters other than letters, digits, ``_`` and ``-``.
    """
    if not _ALIAS.fullmatch(alias):
        raise RegistryNameError(f"Alias '{alias}' may hold only letters, digits, '_' and '-'")
    if alias.lower() == "latest" or _VERSION_LIKE.fullmatch(alias):
        raise RegistryNameError(
            f"Alias '{alias}' is reserved: 'latest' and v<number> already name versions"
        )


def _uc_safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", part) or "model"


def existing_version(versions: list, model_uri: str, run_id: str):
    """The registered version that already holds a logged model, or None.

    A version is matched by the model's id or URI where the registry reports them, and otherwise
    by the run that logged it: Unity Catalog's ``search_model_versions`` gives no ``model_id`` and
    a storage path as ``source``, and a run of a log step logs exactly one model. The oldest match
    wins, so every rerun lands on the same version.
    """
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    matches = [
        version
        for version in versions
        if (model_id and getattr(version, "model_id", None) == model_id)
        or version.source == model_uri
        or (run_id and version.run_id == run_id)
    ]
    return min(matches, key=lambda version: int(version.version), default=None)


# Answers that say the registry has no alias endpoint: MLflow raises a 404 without an MLflow error
# body as ENDPOINT_NOT_FOUND; a server that routes the path but does not implement it answers 405
# or 501. How Azure ML's registry refuses an alias call is not documented, so any of these counts.
_NO_ALIAS_ENDPOINT_CODES = {"ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED"}
_NO_ALIAS_ENDPOINT_STATUSES = {404, 405, 501}
# A registry that has aliases answers these for a missing model or alias, or a refused write.
_ALIAS_ENDPOINT_ANSWERS = {"RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"}


def aliases_unsupported(error: MlflowException) -> bool:
    """Whether a failed alias call means the registry has no alias endpoint at all (a 404 without
    an MLflow error body, a 405 or a 501), rather than a missing model or alias
    (``RESOURCE_DOES_NOT_EXIST``) or a refused write (``PERMISSION_DENIED``)."""
    if error.error_code in _ALIAS_ENDPOINT_ANSWERS:
        return False
    return (
        error.error_code in _NO_ALIAS_ENDPOINT_CODES
        or error.get_http_status_code() in _NO_ALIAS_ENDPOINT_STATUSES
    )


def _versions(client, name: str) -> list:
    # Found by name only (Azure ML's registry search is documented for names, not tags), and each
    # read whole: Unity Catalog's search leaves tags out, and nothing documents that Azure's
    # keeps them. Only the alias fallback reads this, on registries without aliases.
    found = all_pages(client.search_model_versions, MODEL_VERSIONS_PAGE_SIZE,
                      filter_string=f"name = '{name}'")  # fmt: skip
    return [client.get_model_version(name, version.version) for version in found]


def set_alias(client, name: str, alias: str, version: str) -> bool:
    """Point ``alias`` of registered model ``name`` at ``version``: the registry's own alias, or,
    where it has none, the version tag ``alias.<alias>``, taken off every other version.

    Returns:
        True for a registry alias, False for the version tag.
    """
    try:
        client.set_registered_model_alias(name, alias, version)
        return True
    except MlflowException as error:
        if not aliases_unsupported(error):
            raise
    key = alias_tag_key(alias)
    # The new holder first: while the old one still has the tag, the newer time wins.
    client.set_model_version_tag(name, version, key, str(time.time_ns() // 1_000_000))
    for other in _versions(client, name):
        if other.version != str(version) and key in other.tags:
            client.delete_model_version_tag(name, other.version, key)
    return False


def remove_alias(client, name: str, alias: str) -> None:
    """Remove ``alias`` from registered model ``name`` wherever it is held: the registry's own
    alias if it has one, and any version tag standing for it."""
    if alias in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, alias)
    key = alias_tag_key(alias)
    for version in _versions(client, name):
        if key in version.tags:
            client.delete_model_version_tag(name, version.version, key)


def version_by_alias(client, name: str, alias: str):
    """The model version ``alias`` points at, from the registry's alias or, where the registry
    has none, from the version tag standing for it (the newest if two hold it mid-move); None if
    no version holds it.

    Raises:
        MlflowException: a registry failure other than having no alias endpoint.
    """
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        if not aliases_unsupported(error):
            raise
    key = alias_tag_key(alias)
    holders = [version for version in _versions(client, name) if key in version.tags]
    return max(holders, key=lambda version: int(version.tags[key]), default=None)


def alias_model_uri(client, name: str, alias: str) -> str:
    """``models:/<name>/<version>`` of the version ``alias`` points at, on any registry: what
    ``models:/<name>@<alias>`` would load where the registry has aliases.

    Raises:
        LookupError: no version holds the alias.
    """
    version = version_by_alias(client, name, alias)
    if version is None:
        raise LookupError(f"No version of {name} holds @{alias}")
    return f"models:/{name}/{version.version}"

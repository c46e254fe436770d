"""Which names and aliases a Model Registry accepts, checked before anything is registered.

Unity Catalog (registry URI ``databricks-uc``, or ``databricks-uc://<profile>``) keeps models in a
schema: a registered model is named ``catalog.schema.model``, each part made of letters, digits and
underscores, and versions are found by alias, never by stage (UC has no stages). The workspace and
open-source registries take a plain name. Every registry refuses the alias ``latest`` and aliases
shaped like version numbers (``v1``), which would be ambiguous in ``models:/<name>@<alias>``.
"""

from __future__ import annotations

import re

from llm_packager.errors import UserError

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

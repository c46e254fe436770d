"""The fetch_model step function on a local folder, logged to a throwaway SQLite store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from llm_packager.keys import MODEL_TOTAL_BYTES_METRIC
from llm_packager.sources.manifest import ModelFilesError, build_manifest
from steps.fetch_model import fetch_model
from tests.support import local_fetch_parameters


def test_local_folder_is_logged_with_its_manifest(local_tracking, tiny_model_dir, tmp_path):
    request = local_fetch_parameters(tiny_model_dir)
    with mlflow.start_run() as run:
        result = fetch_model(request, run.info.run_id)

    assert result.model_uri == f"runs:/{run.info.run_id}/hf_model"
    logged = Path(
        mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path / "d"))
    )
    manifest = json.loads(
        Path(mlflow.artifacts.download_artifacts(result.manifest_uri)).read_text()
    )
    assert manifest["files"] == [
        {"path": e.path, "size": e.size, "sha256": e.sha256}
        for e in build_manifest(logged, show_progress=False)
    ]
    assert result.total_bytes == sum(row["size"] for row in manifest["files"])
    finished = local_tracking.get_run(run.info.run_id)
    assert finished.data.tags["local_dir"] == str(tiny_model_dir)
    assert finished.data.metrics[MODEL_TOTAL_BYTES_METRIC] == result.total_bytes


def test_lfs_pointer_in_a_local_folder_fails_the_step(local_tracking, tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "clone")
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"
    )
    request = local_fetch_parameters(folder)
    with (
        mlflow.start_run() as run,
        pytest.raises(ModelFilesError, match=r"^model\.safetensors in .* is a Git-LFS pointer"),
    ):
        fetch_model(request, run.info.run_id)
    assert local_tracking.list_artifacts(run.info.run_id) == []

"""Getting an upstream run's files: an outage is told as an outage, never as a damaged run."""

from __future__ import annotations

import pytest

from benchmarks.common import free_loopback_port
from llm_packager.errors import is_server_unreachable
from llm_packager.sources.manifest import ModelFilesError
from llm_packager.sources.upstream import fetched_model


def test_a_gone_artifact_server_is_not_reported_as_a_damaged_run(local_tracking, monkeypatch):
    # The run is in the store, but its artifacts live behind a server on a port nobody listens
    # on: the download meets a refused connection, as when the tracking server goes away
    # between a step's first call and its download.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    experiment = local_tracking.create_experiment(
        "artifacts-gone",
        artifact_location=f"http://127.0.0.1:{free_loopback_port()}/api/2.0/mlflow-artifacts/artifacts",
    )
    run = local_tracking.create_run(experiment)
    with pytest.raises(Exception) as raised:
        fetched_model(run.info.run_id)
    assert not isinstance(raised.value, ModelFilesError), raised.value
    assert is_server_unreachable(raised.value), raised.value


def test_a_logged_gguf_file_is_used_only_if_it_is_the_one_the_run_tagged(
    local_tracking, monkeypatch, tmp_path
):
    """fetched_gguf downloads the run's gguf/ artifact and checks it against its gguf.sha256
    tag: a file that differs, or none at all, is a ModelFilesError (log_onnx then keeps the
    builder's re-quantized build), never a cached or wrong file used silently."""
    import hashlib

    from llm_packager.keys import FETCHED_GGUF_DIR, GGUF_SHA256_TAG
    from llm_packager.sources.upstream import FetchedModel, fetched_gguf

    monkeypatch.setenv("LLM_PACKAGER_CACHE", str(tmp_path / "cache"))
    content = b"GGUF the file fetch_model converted"
    tagged = hashlib.sha256(content).hexdigest()
    experiment = local_tracking.create_experiment("gguf-hand-off")

    def fetch_run(logged: bytes | None) -> FetchedModel:
        run = local_tracking.create_run(experiment, tags={GGUF_SHA256_TAG: tagged})
        if logged is not None:
            path = tmp_path / run.info.run_id / "model.gguf"
            path.parent.mkdir()
            path.write_bytes(logged)
            local_tracking.log_artifact(run.info.run_id, str(path), FETCHED_GGUF_DIR)
        return FetchedModel(run.info.run_id, tmp_path, [], {GGUF_SHA256_TAG: tagged})

    with pytest.raises(ModelFilesError, match=f"not the {tagged} its tag records"):
        fetched_gguf(fetch_run(b"GGUF another file"))
    with pytest.raises(ModelFilesError, match="no usable GGUF file"):
        fetched_gguf(fetch_run(None))
    assert not (tmp_path / "cache" / "gguf" / f"{tagged}.gguf").exists()
    got = fetched_gguf(fetch_run(content))
    assert got == tmp_path / "cache" / "gguf" / f"{tagged}.gguf"
    assert got.read_bytes() == content
    assert fetched_gguf(FetchedModel("r", tmp_path, [], {})) is None

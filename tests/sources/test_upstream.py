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

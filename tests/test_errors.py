"""How long a gone tracking server can keep the user's `mlflow run` command waiting: the MLflow
HTTP settings of `bound_tracking_retries`, as MLflow really applies them, and the README's
export line that hands them to the outer `mlflow run` (which reads none of our settings).

The end-to-end check, a real `mlflow server` killed during a step, is in
tests/integration/test_faults.py.
"""

from __future__ import annotations

import http.server
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from llm_packager.config.schema import TrackingConfig
from llm_packager.errors import (
    bound_tracking_retries,
    is_server_unreachable,
    one_line,
    tracking_exports,
)
from llm_packager.project import PROJECT_DIR

# Calls that wait for a gone server one after the other, counted here rather than taken from the
# code under test: the running step's next call, then the outer `mlflow run`'s get_run of main's
# run after main exits (`_maybe_set_run_terminated` in mlflow/projects/__init__.py).
CALLS_IN_TURN = 2
_SETTING = r"MLFLOW_\w+=\S+"
_EXPORT_LINE = re.compile(rf"^export ({_SETTING}(?: {_SETTING})*)$", re.MULTILINE)


def readme_exports(text: str) -> list[dict[str, str]]:
    """Every ``export MLFLOW_...`` line of a README, as name-value pairs."""
    return [
        dict(pair.split("=", 1) for pair in match.group(1).split())
        for match in _EXPORT_LINE.finditer(text)
    ]


def worst_case_seconds(settings: dict[str, str]) -> float:
    """The longest one MLflow request can take against a server that never answers, computed
    from urllib3's documented Retry rules rather than from our code: no sleep before the first
    retry, then factor * 2**(n-1) s before retry n, capped at 120 s (Retry.DEFAULT_BACKOFF_MAX),
    plus up to `backoff_jitter` s; each of the retries + 1 attempts may wait the whole timeout."""
    retries = int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = int(settings["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    jitter = float(settings["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
    timeout = int(settings["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    sleeps = sum(min(factor * 2 ** (n - 1), 120) + jitter for n in range(2, retries + 1))
    return sleeps + (retries + 1) * timeout


@pytest.mark.parametrize("budget", [10, 20, 30, 60, 300, 900, 3600])
def test_the_requests_that_wait_in_turn_fit_the_budget_together(budget):
    settings = bound_tracking_retries(budget)
    assert CALLS_IN_TURN * worst_case_seconds(settings) <= budget
    # On a Databricks tracking URI, databricks-sdk retries until its deadline; an attempt started
    # just before it may wait a whole timeout.
    sdk_deadline = int(settings["MLFLOW_DATABRICKS_ENDPOINT_HTTP_RETRY_TIMEOUT"])
    assert CALLS_IN_TURN * (sdk_deadline + int(settings["MLFLOW_HTTP_REQUEST_TIMEOUT"])) <= budget
    # MLflow refuses more than 10 retries (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT); a retry at all
    # is what rides out a dropped connection.
    assert 1 <= int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 10


def test_the_default_budget_rides_out_a_server_restart_of_a_minute():
    # A stopped server refuses at once, so only the sleeps between attempts count: the last
    # retry comes after them (urllib3: no sleep before the first retry, factor * 2**(n-1) before
    # retry n).
    settings = bound_tracking_retries(TrackingConfig().server_timeout_s)
    retries = int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = int(settings["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    assert sum(factor * 2 ** (n - 1) for n in range(2, retries + 1)) >= 60


def test_the_readme_exports_what_the_default_timeout_needs():
    readme = (PROJECT_DIR / "README.md").read_text()
    default = bound_tracking_retries(TrackingConfig().server_timeout_s)
    found = readme_exports(readme)
    assert found, "README.md has no `export MLFLOW_HTTP_REQUEST_...` line before `mlflow run`"
    assert all(exports == default for exports in found), (found, default)


def test_a_readme_with_other_values_is_caught():
    default = bound_tracking_retries(TrackingConfig().server_timeout_s)
    line = tracking_exports(TrackingConfig().server_timeout_s)
    assert readme_exports(f"text\n{line}\nmlflow run .\n") == [default]
    stale = line.replace("MLFLOW_HTTP_REQUEST_MAX_RETRIES=", "MLFLOW_HTTP_REQUEST_MAX_RETRIES=9")
    assert readme_exports(f"{stale}\n") != [default]


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers: a server whose process hangs,
    or whose host is gone behind a load balancer that still accepts."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def refusing_server() -> str:
    """A loopback port nothing listens on: a stopped server (the port is freed, then reused by
    nothing while the test runs)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _seconds_to_give_up(uri: str) -> float:
    began = time.monotonic()
    with pytest.raises(MlflowException) as raised:
        MlflowClient(tracking_uri=uri).get_run("0" * 32)
    spent = time.monotonic() - began
    # Told as an unreachable server in one line, naming it.
    assert is_server_unreachable(raised.value), raised.value
    return spent


def test_mlflow_gives_up_on_a_silent_server_within_the_share_of_one_request(
    silent_server, monkeypatch
):
    budget = 10
    settings = bound_tracking_retries(budget)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    spent = _seconds_to_give_up(silent_server)
    # Every attempt waited its whole timeout: the settings reached MLflow, and the share holds.
    attempts = int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
    assert attempts * int(settings["MLFLOW_HTTP_REQUEST_TIMEOUT"]) - 0.5 <= spent
    assert spent <= budget / CALLS_IN_TURN


def test_mlflow_gives_up_on_a_stopped_server_after_its_sleeps(refusing_server, monkeypatch):
    budget = 60
    settings = bound_tracking_retries(budget)
    assert int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) >= 2, "no sleep to measure"
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    spent = _seconds_to_give_up(refusing_server)
    factor = int(settings["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    retries = int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert sum(factor * 2 ** (n - 1) for n in range(2, retries + 1)) - 0.5 <= spent
    assert spent <= budget / CALLS_IN_TURN


class _StoreFullServer(http.server.BaseHTTPRequestHandler):
    """A tracking server whose artifact store cannot take a file: it answers its health check,
    and drops an upload's connection after its first chunk, which resets it under a client still
    sending (what MLflow's server did, now and then, with a full tmpfs: the upload failed with
    "Connection reset by peer" on every retry, in tests/integration/test_faults.py)."""

    def do_GET(self) -> None:
        if self.path.startswith("/api/2.0/mlflow-artifacts/artifacts/"):
            self._drop()  # a file's download
            return
        # /health, or the artifact listing, which names no file: the path is a file, not a folder.
        body = b"OK" if self.path == "/health" else b'{"files": []}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drop(self) -> None:
        # Closed with no answer: a zero linger resets the connection under the client, as an
        # unread receive buffer does on close.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def do_PUT(self) -> None:
        self.rfile.read(1 << 16)  # the write fails at the first chunk
        self._drop()  # most of the upload unread

    def log_message(self, *arguments) -> None:  # quiet
        pass


def _upload_error(uri: str, tmp_path) -> MlflowException:
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    big = tmp_path / "model.onnx.data"
    big.write_bytes(b"\0" * (16 << 20))  # still being sent when the server closes
    repository = HttpArtifactRepository(f"{uri}/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts")
    with pytest.raises(MlflowException) as raised:
        repository.log_artifact(str(big), "onnx")
    return raised.value


@pytest.fixture
def dropping_server(monkeypatch) -> Iterator[tuple[str, http.server.ThreadingHTTPServer]]:
    """`_StoreFullServer` on a free loopback port as the tracking server, with one retry."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StoreFullServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri, server
    server.shutdown()
    server.server_close()


def test_a_download_a_live_server_keeps_dropping_is_not_told_as_missing_files(
    tmp_path, dropping_server
):
    # fetch_model's files are fixed by fetching again only when they are missing; a download
    # the server keeps dropping is told as what it is.
    from llm_packager.sources.upstream import _download

    uri, _ = dropping_server
    artifacts = f"{uri}/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts"
    with pytest.raises(MlflowException) as raised:
        _download(artifacts, "model.safetensors", tmp_path, "model files", "abc")
    assert one_line(raised.value).startswith(
        f"The tracking server {uri} could not store or serve the artifact 1/abc/artifacts/"
        "model.safetensors: it closed the connection mid-request to every retry."
    )


def test_an_upload_a_live_server_keeps_dropping_is_the_store_failing_not_the_server_gone(
    tmp_path, dropping_server
):
    uri, server = dropping_server
    try:
        error = _upload_error(uri, tmp_path)
        assert "Connection aborted" in str(error), error  # the reset, not the 500, reached us
        assert not is_server_unreachable(error)
        assert one_line(error) == (
            f"The tracking server {uri} could not store or serve the artifact 1/abc/artifacts/"
            "onnx/model.onnx.data: it closed the connection mid-request to every retry. A full "
            "or unwritable artifact store (on an upload), a proxy's size limit or a server "
            "worker that crashed is the usual cause, and the server's log says which; fix it and "
            "rerun (a rerun reuses every step that finished)"
        )
    finally:
        server.shutdown()
        server.server_close()
    # The same failure met once the server no longer answers is the server gone.
    error = MlflowException(str(error))
    assert is_server_unreachable(error)
    assert one_line(error).startswith(f"The tracking server {uri} cannot be reached")

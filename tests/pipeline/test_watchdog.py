"""main's watch on the tracking server while a step computes without calling it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from benchmarks.common import free_loopback_port
from llm_packager.pipeline.watchdog import health_url, wait_watching_server


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *arguments) -> None:
        return None


def _busy_step(seconds: float) -> subprocess.Popen:
    # A step that works without calling the server, then ends well.
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"],
                            start_new_session=True)  # fmt: skip


def test_only_http_tracking_servers_are_watched():
    assert health_url("http://127.0.0.1:5000/") == "http://127.0.0.1:5000/health"
    assert health_url("https://mlflow.example.com") == "https://mlflow.example.com/health"
    for uri in ("databricks", "sqlite:///mlflow.db", "file:///tmp/mlruns", "azureml://x"):
        assert health_url(uri) is None


def test_a_step_is_stopped_once_the_server_stays_silent_and_left_alone_while_it_answers():
    gone = f"http://127.0.0.1:{free_loopback_port()}"  # nobody listens there
    step = _busy_step(60)
    began = time.monotonic()
    assert wait_watching_server(step, gone, silent_limit_s=1.0, poll_s=0.2) is None
    assert time.monotonic() - began < 10
    assert step.poll() is not None  # stopped, not left running

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        step = _busy_step(2)
        answering = f"http://127.0.0.1:{server.server_port}"
        assert wait_watching_server(step, answering, silent_limit_s=0.5, poll_s=0.2) == 0
    finally:
        server.shutdown()
        server.server_close()

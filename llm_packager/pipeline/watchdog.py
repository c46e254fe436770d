"""Waiting for a step's process while watching that the tracking server still answers.

A step that computes (an ONNX build, an evaluation) makes no tracking call for minutes, so it
cannot notice that the server has gone until its next call, and then waits through MLflow's
retries. ``main`` waits for it meanwhile and asks the server's ``/health`` endpoint every few
seconds; once the server has not answered for as long as a step's call would wait, it stops the
step. So the whole command gives up within ``tracking.server_timeout_s`` of the server going away
whatever the step is doing (docs/operations.md). Only servers with an HTTP(S) tracking URI are
watched: Databricks and Azure ML hosts have no open ``/health`` endpoint, and a local store
cannot go away.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

# How often main asks the server, and how long one question may take.
HEALTH_POLL_S = 5.0


def health_url(tracking_uri: str) -> str | None:
    """The ``/health`` endpoint of an HTTP(S) tracking server, or None for any other store."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return None
    return tracking_uri.rstrip("/") + "/health"


def _credentials() -> dict:
    # As MLflow's own calls carry them (MLFLOW_TRACKING_TOKEN, or username and password): a
    # server that refuses anonymous requests, or counts them, sees the same client.
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"headers": {"Authorization": f"Bearer {token}"}}
    username, password = (os.environ.get("MLFLOW_TRACKING_USERNAME"),
                          os.environ.get("MLFLOW_TRACKING_PASSWORD"))  # fmt: skip
    return {"auth": (username, password)} if username and password else {}


def server_answers(url: str, timeout_s: float) -> bool:
    """Whether the server answers at all: any answer below 500 counts (a 401 or 404 comes from a
    live server); a refused connection, a timeout or a 5xx (a proxy whose server is gone) does
    not."""
    import requests

    try:
        return requests.get(url, timeout=timeout_s, **_credentials()).status_code < 500
    except requests.RequestException:
        return False


def _stop(process: subprocess.Popen) -> None:
    # SIGKILL, not SIGTERM: a step told to stop would try to end its run on the server, and wait
    # through MLflow's retries for a server that is gone.
    try:
        if process.pid == os.getpgid(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except OSError:  # it ended on its own meanwhile
        pass
    process.wait()


def wait_watching_server(
    process: subprocess.Popen,
    tracking_uri: str,
    silent_limit_s: float,
    poll_s: float = HEALTH_POLL_S,
) -> int | None:
    """The step process's exit code; or None, with the process stopped, once the tracking server
    at ``tracking_uri`` has not answered for ``silent_limit_s`` seconds."""
    url = health_url(tracking_uri)
    silent_since: float | None = None
    while True:
        try:
            return process.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if url is None:
                continue
        asked = time.monotonic()
        # One question may wait the whole limit: a server busy with other requests (one worker
        # taking uploads) answers late, and is not gone.
        if server_answers(url, timeout_s=silent_limit_s):
            silent_since = None
            continue
        silent_since = asked if silent_since is None else silent_since
        if time.monotonic() - silent_since >= silent_limit_s:
            logger.error("The tracking server has not answered %s for %.0f s; stopping the step",
                         url, time.monotonic() - silent_since)  # fmt: skip
            _stop(process)
            return None

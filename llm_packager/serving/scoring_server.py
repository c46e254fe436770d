"""What the served model does for MLflow's scoring server (``mlflow models serve``): give it the
threads batching and the queue limit need, and stop waiting for a request it has timed out.

MLflow 3.17's scoring server (``mlflow/pyfunc/scoring_server/__init__.py``) runs each request's
``predict`` with ``asyncio.to_thread``, on the event loop's default executor, which asyncio makes
with ``min(32, cores + 4)`` threads: 6 on 2 cores. Requests past that wait in the executor's
queue, never reach the model, and end in the server's 504 (its ``timeout_middleware``, after
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds), so a batch of 8 never filled and the model's
own queue limit (HTTP 503) could not be reached. uvicorn imports the app, and so loads the
model, inside its running event loop (``uvicorn.Server._serve`` calls ``config.load()``), so
``load_context`` can give that loop a larger default executor before the first request.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

_logger = logging.getLogger(__name__)

# Set by MLflow's `mlflow models serve` for the server process (its get_cmd), in seconds.
REQUEST_TIMEOUT_VARIABLE = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
# Threads beyond those that hold rows and wait: a request that finds the queue full must reach
# the model to be answered 503, and health checks must not wait behind generation.
SPARE_THREADS = 4


def server_timeout() -> float | None:
    """The scoring server's request timeout, when this process serves one: past it the client
    has its 504, and the model stops generating for the request."""
    value = os.environ.get(REQUEST_TIMEOUT_VARIABLE)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def grow_server_threads(requests: int) -> int | None:
    """Give the event loop running in this thread (uvicorn's, while it loads the model) a
    default executor of ``requests + SPARE_THREADS`` threads, where asyncio's default would have
    fewer. Returns the threads given, or None outside a running loop (the model loaded by
    ``mlflow.pyfunc.load_model`` in a script, a batch job): nothing is changed there."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    threads = requests + SPARE_THREADS
    if threads <= min(32, (os.cpu_count() or 1) + 4):
        return None
    loop.set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="scoring"))
    _logger.info("The scoring server runs predict on %d threads", threads)
    return threads

"""What the served model does for MLflow's scoring server (``mlflow models serve``): give it the
threads batching and the queue limit need, and stop waiting for a request it has timed out.

MLflow 3.17's scoring server (``mlflow/pyfunc/scoring_server/__init__.py``) runs each request's
``predict`` with ``asyncio.to_thread``, on the event loop's default executor, which asyncio makes
with ``min(32, cores + 4)`` threads: 6 on 2 cores. Requests past that wait in the executor's
queue, never reach the model, and end in the server's 504 (its ``timeout_middleware``, after
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds), so a batch of 8 never filled and the model's
own queue limit (HTTP 503) could not be reached. The model gives that loop a larger default
executor: at once where it loads inside the running loop (uvicorn with several workers imports
the app in ``Server._serve``), otherwise (one worker: uvicorn 0.54's ``main.run`` imports the app
before it creates the loop) from a thread that waits for the server's loop to run, and sets it
there with ``call_soon_threadsafe``, before the server's start-up ends.

That second way rests on two things no interface promises: that uvicorn runs its loop on the
main thread, and that MLflow runs ``predict`` on the loop's default executor
(``asyncio.to_thread``). tests/serving/test_server_limits.py fails if either stops holding (no
503 under load). A setting in MLflow's scoring server for its thread count would replace it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
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
    """Give the scoring server's event loop a default executor of ``requests + SPARE_THREADS``
    threads, where asyncio's default would have fewer. Returns the threads it will have, or None
    where this process is no scoring server (the model loaded by ``mlflow.pyfunc.load_model`` in
    a script or a batch job): nothing is changed there."""
    threads = requests + SPARE_THREADS
    if server_timeout() is None or threads <= min(32, (os.cpu_count() or 1) + 4):
        return None
    try:
        _give_threads(asyncio.get_running_loop(), threads)
    except RuntimeError:  # loaded before the server's loop exists: wait for it
        threading.Thread(target=_when_the_loop_runs, args=(threads,), daemon=True,
                         name="scoring-threads").start()  # fmt: skip
    return threads


def _give_threads(loop: asyncio.AbstractEventLoop, threads: int) -> None:
    # A server that already gave its loop as many threads or more (the OpenAI endpoint's
    # --threads) keeps its own pool.
    current = getattr(loop, "_default_executor", None)
    if current is not None and getattr(current, "_max_workers", 0) >= threads:
        return
    loop.set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="scoring"))
    _logger.info("The scoring server runs predict on %d threads", threads)


def _when_the_loop_runs(threads: int, seconds: float = 60) -> None:
    """Find the event loop the server runs on the main thread (asyncio names no other thread's
    running loop), then set its executor from its own thread. Each look scans the heap, so the
    looks slow down, and stop after ``seconds``."""
    deadline = time.monotonic() + seconds
    pause = 0.05
    while time.monotonic() < deadline:
        main = threading.main_thread().ident
        # type(), not isinstance(): isinstance may read an object's __class__, and some heap
        # objects (torch's deprecated aliases) warn or raise when touched.
        loop_type = asyncio.AbstractEventLoop
        running = [obj for obj in gc.get_objects()
                   if issubclass(type(obj), loop_type) and obj.is_running()]  # fmt: skip
        # The main thread's loop (uvicorn's), else the only one running (a server run from a
        # worker thread); never a guess between several.
        loops = [loop for loop in running if getattr(loop, "_thread_id", None) == main]
        loops = loops or (running if len(running) == 1 else [])
        if loops:
            loops[0].call_soon_threadsafe(_give_threads, loops[0], threads)
            return
        time.sleep(pause)
        pause = min(pause * 2, 2.0)
    _logger.warning("No event loop ran within %d s; the scoring server keeps its threads", seconds)

"""What every benchmark shares: the machine description, summary statistics, table rows, and
servers on loopback (which the tests share too)."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
PACKAGES = ("mlflow", "torch", "transformers", "onnxruntime-genai", "onnxruntime", "numpy")


def summarise(values: list[float]) -> dict[str, float | int]:
    """Median, min and max of repeated measurements, and how many there were."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def cell(summary: dict[str, float | int], digits: int = 2) -> str:
    """``median (min-max)`` for a Markdown table cell."""
    return (
        f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}-{summary['max']:.{digits}f})"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict[str, object]:
    """The machine, the interpreter and the versions the figures were taken with."""
    try:
        total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total_memory = 0
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=PROJECT_DIR, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(total_memory / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": commit,
        "versions": {name: importlib.metadata.version(name) for name in PACKAGES},
    }


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackProcess:
    """A server process on a free loopback port, polled until it answers; it can be stopped and
    started again on the same port (a test's outage). ``environment`` is added to this
    process's environment; the output goes to the file ``log``.

    It lives here, not under tests/, because the benchmarks and the tests both start servers this
    way, and this module needs nothing but the standard library: a test importing it pulls in no
    benchmark, while a benchmark importing the tests would pull in pytest fixtures and the test
    data (``tests/support.py`` reads conf/ when it is imported).
    """

    def __init__(
        self,
        command: Callable[[int], list[str]],
        ready_path: str,
        *,
        log: Path,
        environment: dict[str, str] | None = None,
        cwd: Path | None = None,
        start_seconds: float = 120,
        stop_seconds: float = 30,
    ) -> None:
        self.port = free_loopback_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._command = command(self.port)
        self._ready_url = f"{self.uri}{ready_path}"
        self._environment = environment or {}
        self._cwd = cwd
        self._start_seconds = start_seconds
        self._stop_seconds = stop_seconds
        self._process: subprocess.Popen | None = None

    def start(self) -> LoopbackProcess:
        """Start the command and return once ``ready_path`` answers (any 2xx or 3xx status).

        Raises:
            RuntimeError: the process exited, or did not answer within ``start_seconds``; the
                message ends with its log.
        """
        # Appended to, so that a restarted process keeps what it said before; the child keeps
        # its own copy of the file descriptor.
        with self.log.open("a") as log:
            self._process = subprocess.Popen(
                self._command, stdout=log, stderr=subprocess.STDOUT, cwd=self._cwd,
                # Read at each start: a restarted server sees the environment as it is then.
                env={**os.environ, **self._environment},
            )  # fmt: skip
        deadline = time.monotonic() + self._start_seconds
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(self._ready_url, timeout=10):
                return self
            if self._process.poll() is not None:
                self._fail(f"exited with code {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                self._fail(f"did not answer {self._ready_url} in {self._start_seconds:.0f} s")
            time.sleep(0.5)

    def _fail(self, why: str) -> None:
        told = self.log.read_text(errors="replace")[-5000:] if self.log.is_file() else ""
        raise RuntimeError(f"{' '.join(self._command[:4])} {why}; its log:\n{told}")

    def stop(self) -> None:
        """Terminate the process (kill it if it does not end within ``stop_seconds``)."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=self._stop_seconds)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


@contextlib.contextmanager
def local_server(
    command: Callable[[int], list[str]],
    ready_path: str,
    *,
    environment: dict[str, str],
    start_seconds: float,
    log: Path | None = None,
    cwd: Path | None = None,
) -> Iterator[str]:
    """Start ``command(port)`` on a free loopback port; yield its URL once ``ready_path`` answers,
    and stop it on the way out. Its output goes to ``log`` (a temporary file if none).

    Raises:
        RuntimeError: the server exited, or did not answer within ``start_seconds``.
    """
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "server.log"
        server = LoopbackProcess(command, ready_path, log=log, environment=environment,
                                 cwd=cwd, start_seconds=start_seconds)  # fmt: skip
        server.start()
        stack.callback(server.stop)
        yield server.uri

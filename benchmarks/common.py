"""What every benchmark shares: the machine description, summary statistics and table rows."""

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


@contextlib.contextmanager
def local_server(
    command: Callable[[int], list[str]],
    ready_path: str,
    *,
    environment: dict[str, str],
    start_seconds: float,
) -> Iterator[str]:
    """Start ``command(port)`` on a free loopback port; yield its URL once ``ready_path`` answers.

    Raises:
        RuntimeError: the server exited, or did not answer within ``start_seconds``.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{uri}{ready_path}", timeout=10)
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command(port)[:4])} did not start")
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)

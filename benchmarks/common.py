"""What every benchmark shares: the machine description, summary statistics and table rows."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
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

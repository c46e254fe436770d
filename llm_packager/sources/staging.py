"""Staging folders for the caches: filled and verified before an atomic rename into place.

Each staging folder is named after the process that writes it (``.download-<pid>-<random>``), so
the folders a killed process left behind are recognised and removed by the next process that uses
the same cache, while a folder another live process is still filling is left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import psutil

_PREFIX = ".download-"

logger = logging.getLogger(__name__)


def staging_folder(parent: Path) -> Path:
    """A new, empty staging folder in ``parent`` (created), named after this process."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent))


def remove_abandoned_staging(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` whose process no longer runs; return them."""
    removed = []
    for folder in parent.glob(f"{_PREFIX}*"):
        owner = folder.name.removeprefix(_PREFIX).split("-", 1)[0]
        if owner.isdigit() and psutil.pid_exists(int(owner)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        logger.info("Removed %s, left by a process that ended before finishing it", folder)
    return removed

"""Where the project lies and which version of its code is running.

The code version is part of every step run's reuse key (docs/architecture.md, "Reusing step
runs"): it changes whenever the code that a step runs changes.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Everything a step's behaviour depends on; README, tests and data files are left out on purpose
# so that editing them does not invalidate finished step runs.
CODE_PATHS = ("MLproject", "conda.yaml", "requirements.txt", "steps", "llm_packager", "conf")


def _content_hash(project_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in CODE_PATHS:
        root = project_dir / name
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for path in files:
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            digest.update(path.relative_to(project_dir).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(project_dir: Path, *arguments: str) -> str | None:
    try:
        completed = subprocess.run(
            ["git", "-C", str(project_dir), *arguments],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return completed.stdout.strip()


def code_version(project_dir: Path = PROJECT_DIR) -> str:
    """Identify the code a step would run.

    Returns:
        The git commit when the code paths are clean; the commit plus a hash of their content when
        they have uncommitted changes (a bare dirty flag would make two different edits look the
        same); a content hash outside git.
    """
    commit = _git(project_dir, "rev-parse", "HEAD")
    if commit is None:
        return f"content-{_content_hash(project_dir)[:16]}"
    status = _git(project_dir, "status", "--porcelain", "--", *CODE_PATHS)
    if status:
        return f"{commit}-dirty-{_content_hash(project_dir)[:16]}"
    return commit

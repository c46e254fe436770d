"""What the MLproject file declares, and which version of the code is running.

Both feed the reuse key (DESIGN.md §4): parameters are normalised to the strings MLflow logs, with
the entry point's defaults filled in, and the code version changes whenever the code that a step
runs changes.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Everything a step's behaviour depends on; README, tests and data files are left out on purpose
# so that editing them does not invalidate finished step runs.
CODE_PATHS = ("MLproject", "conda.yaml", "requirements.txt", "steps", "llm_packager", "conf")


class ParameterError(ValueError):
    """A step parameter is unknown or does not have its declared type."""


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter of an MLproject entry point."""

    name: str
    type: str
    default: object | None


def load_entry_points(project_dir: Path = PROJECT_DIR) -> dict[str, dict[str, ParameterSpec]]:
    """Read the entry points of an MLproject file and their declared parameters."""
    document = yaml.safe_load((project_dir / "MLproject").read_text())
    entry_points = {}
    for entry_point, body in document["entry_points"].items():
        entry_points[entry_point] = {
            name: ParameterSpec(name, spec.get("type", "string"), spec.get("default"))
            for name, spec in (body.get("parameters") or {}).items()
        }
    return entry_points


def load_entry_point_commands(project_dir: Path = PROJECT_DIR) -> dict[str, str]:
    """Each MLproject entry point's command template, ``{parameter}`` placeholders and all."""
    document = yaml.safe_load((project_dir / "MLproject").read_text())
    return {name: body["command"] for name, body in document["entry_points"].items()}


def _normalise(spec: ParameterSpec, value: object) -> str:
    try:
        if spec.type == "int":
            return str(int(str(value)))
        if spec.type == "float":
            return repr(float(str(value)))
    except ValueError as error:
        raise ParameterError(
            f"parameter '{spec.name}' must be {spec.type}, got {value!r}"
        ) from error
    return str(value)


def normalise_parameters(
    specs: dict[str, ParameterSpec], given: dict[str, object]
) -> dict[str, str]:
    """Fill in defaults and turn every value into one canonical string per declared type.

    ``3``, ``"3"`` and ``"03"`` give the same string for an int parameter, so a value typed on
    the command line matches the same value passed from Python.

    Raises:
        ParameterError: an undeclared parameter, a missing required one, or a value of the
            wrong type.
    """
    if unknown := sorted(set(given) - set(specs)):
        raise ParameterError(f"unknown parameter(s): {', '.join(unknown)}")
    normalised = {}
    for name, spec in specs.items():
        if name in given:
            value = given[name]
        elif spec.default is not None:
            value = spec.default
        else:
            raise ParameterError(f"parameter '{name}' is required")
        normalised[name] = _normalise(spec, value)
    return normalised


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

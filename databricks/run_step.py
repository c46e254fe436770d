"""A Databricks job task: run one entry point's module exactly as MLproject's command does, in a
virtual environment of the project's own lock, beside the runtime's Python and not over it.

Usage (the task in databricks.yml)::

    run_step.py [--lock FILE]... [--cuda] [--wheelhouse DIR|none] <entry point> [arguments]

With one or more ``--lock`` files the task first makes (or reuses) a virtual environment under
``$LLM_PACKAGER_VENVS`` (the node's local disk on Databricks), installs the locks into it with
pip, and runs itself again with that environment's Python. The runtime's own environment is left
alone: installing numpy 2 over Databricks Runtime 15.4's numpy 1 stopped the driver's Python REPL
from starting (dask-contrib/dask-databricks#41), and a cluster library installs into that very
environment. ``--cuda`` then swaps the CPU packages for requirements-cuda.txt's, as that file
says to. ``--wheelhouse`` is a folder of wheels (a Unity Catalog volume) pip looks in first, so a
new cluster need not download torch again; ``none`` looks on PyPI only.

Then it runs the module ``steps.<entry point>`` as ``__main__``, as ``python -m steps.<entry
point> ...`` would, so the code is the same everywhere; ``main`` then runs every pipeline step as a
nested MLflow run on the same cluster, with the same Python. The module's exit code is the task's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

# Databricks runs this file by path, so only its own folder is importable; the steps import the
# project's package from the project root.
PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

VENVS_ENV = "LLM_PACKAGER_VENVS"
# Where environments go when the job sets no $LLM_PACKAGER_VENVS: the node's local disk.
DEFAULT_VENVS = "/local_disk0/llm_packager/venvs"
# Written last, so an environment whose install was cut short is made again, not used.
COMPLETE_MARK = ".llm_packager_complete"
# requirements-cuda.txt's own instructions: these CPU packages go before its CUDA ones come in
# (each pair installs the same Python module, so both cannot stay).
CUDA_REPLACES = ("onnxruntime-genai", "onnxruntime", "torch")
CUDA_LOCK = "requirements-cuda.txt"


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's options come before the entry point; everything after it is the step's."""
    parser = argparse.ArgumentParser(prog="run_step.py", add_help=False, allow_abbrev=False)
    parser.add_argument("--lock", action="append", default=[])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--wheelhouse", default="none")
    first_step_argument = next(
        (index for index, value in enumerate(argv) if not value.startswith("--")
         and (index == 0 or argv[index - 1] not in ("--lock", "--wheelhouse"))),
        len(argv),
    )  # fmt: skip
    own, rest = argv[:first_step_argument], argv[first_step_argument:]
    if not rest or not (PROJECT_DIR / "steps" / f"{rest[0]}.py").is_file():
        sys.exit("usage: run_step.py <entry point> [arguments]; the entry point names steps/*.py")
    return parser.parse_args(own), rest


def environment_key(locks: list[Path], cuda: bool) -> str:
    """One environment per set of lock contents and Python version: a changed lock makes a new
    one, an unchanged one is reused."""
    digest = hashlib.sha256(f"{sys.version_info[:2]} cuda={cuda}".encode())
    for lock in locks:
        digest.update(lock.read_bytes())
    return digest.hexdigest()[:16]


def _pip(python: Path, wheelhouse: str, *arguments: str) -> None:
    find_links = [] if wheelhouse == "none" else ["--find-links", wheelhouse]
    command = [str(python), "-m", "pip", "--disable-pip-version-check", *arguments]
    if arguments[0] == "install":
        command += find_links
    subprocess.run(command, check=True)


def ensure_environment(locks: list[Path], cuda: bool, wheelhouse: str, root: Path) -> Path:
    """The Python of an environment holding exactly the locks, made if it is not there whole."""
    folder = root / environment_key(locks, cuda)
    python = folder / "bin" / "python"
    if (folder / COMPLETE_MARK).is_file():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    for lock in locks:
        _pip(python, wheelhouse, "install", "--requirement", str(lock))
    if cuda:
        _pip(python, wheelhouse, "uninstall", "--yes", *CUDA_REPLACES)
        _pip(python, wheelhouse, "install", "--requirement", str(PROJECT_DIR / CUDA_LOCK))
    (folder / COMPLETE_MARK).write_text("\n".join(str(lock) for lock in locks) + "\n")
    return python


def workspace_credentials(environment: dict[str, str]) -> dict[str, str]:
    """The workspace host and a token for MLflow in the task's own environment, read here, in the
    runtime's Python, where databricks-sdk finds them from the runtime's own context.

    MLflow inside a Databricks runtime takes its credentials from that context (dbutils and the
    runtime's modules), which live in the runtime's environment, not in ours; without these two
    variables, MLflow in our environment would have no way to reach the workspace. Nothing is
    changed where the job already sets ``DATABRICKS_HOST``, or where the SDK finds nothing (the
    error is then MLflow's own, at its first call). The token travels in the environment only,
    never on a command line, a tag or a log line.
    """
    if environment.get("DATABRICKS_HOST"):
        return {}
    try:
        from databricks.sdk.core import Config

        config = Config()
        authorization = config.authenticate().get("Authorization", "")
    except Exception as error:  # the SDK absent or without credentials: MLflow will say so
        print(f"run_step.py: no workspace credentials from databricks-sdk ({type(error).__name__})",
              file=sys.stderr)  # fmt: skip
        return {}
    scheme, _, token = authorization.partition(" ")
    if scheme != "Bearer" or not token or not config.host:
        return {}
    return {"DATABRICKS_HOST": config.host, "DATABRICKS_TOKEN": token}


def activated(environment: dict[str, str], python: Path) -> dict[str, str]:
    """``environment`` as the environment's ``bin/activate`` leaves it: its ``bin`` first on PATH.

    ``main`` starts every step through MLflow's local backend, as the shell command ``python -m
    steps.<step>`` of MLproject: without this, that ``python`` would be the runtime's (first on a
    Databricks node's PATH), which has none of the lock's packages.
    """
    folder = python.parent.absolute()  # the steps run in the project folder, not in ours
    path = environment.get("PATH") or os.defpath  # unset: the shell's default search path
    return {**environment, "PATH": f"{folder}{os.pathsep}{path}", "VIRTUAL_ENV": str(folder.parent)}


def main() -> None:
    options, rest = _arguments(sys.argv[1:])
    if options.lock:
        locks = [PROJECT_DIR / lock for lock in options.lock]
        root = Path(os.environ.get(VENVS_ENV, DEFAULT_VENVS))
        try:
            python = ensure_environment(locks, options.cuda, options.wheelhouse, root)
        except subprocess.CalledProcessError as error:
            sys.exit(f"run_step.py: making the task's environment failed: {error}")
        os.environ.update(workspace_credentials(dict(os.environ)))
        # The same script, now in the environment, without the options that made it.
        os.execve(python, [str(python), str(Path(__file__).resolve()), *rest],
                  activated(dict(os.environ), python))  # fmt: skip
    entry_point = rest[0]
    sys.argv = [f"steps/{entry_point}.py", *rest[1:]]
    runpy.run_module(f"steps.{entry_point}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

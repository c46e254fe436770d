"""A Databricks job task: run one entry point's module exactly as MLproject's command does.

Usage (the task in databricks.yml): ``run_step.py main <main's MLproject arguments>``. It runs
the module ``steps.<entry point>`` as ``__main__``, as ``python -m steps.<entry point> ...``
would, so the code is the same everywhere; ``main`` then runs every pipeline step as a nested
MLflow run on the same cluster. The module's exit code is the task's outcome.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

# Databricks runs this file by path, so only its own folder is importable; the steps import the
# project's package from the project root.
PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))


def main() -> None:
    if len(sys.argv) < 2 or not (PROJECT_DIR / "steps" / f"{sys.argv[1]}.py").is_file():
        sys.exit("usage: run_step.py <entry point> [arguments]; the entry point names steps/*.py")
    entry_point = sys.argv[1]
    sys.argv = [f"steps/{entry_point}.py", *sys.argv[2:]]
    runpy.run_module(f"steps.{entry_point}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

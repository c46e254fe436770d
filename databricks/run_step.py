"""A Databricks job task: run one pipeline step as ``mlflow run`` would, then pass its run id on.

Usage (the tasks in databricks.yml): ``run_step.py <entry point> <the entry point's MLproject
arguments>``. It runs the module ``steps.<entry point>`` as ``__main__``, exactly as MLproject's
``python -m steps.<entry point> ...`` command does, so the step code is the same everywhere. On
Databricks, the step's MLflow run id is then set as the task value ``run_id``, which the tasks
after it receive as ``{{tasks.<entry point>.values.run_id}}``. Elsewhere it is only logged.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
from pathlib import Path

# Databricks runs this file by path, so only its own folder is importable; the steps import the
# project's package from the project root.
PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

logger = logging.getLogger("run_step")


def _publish_run_id(entry_point: str) -> None:
    import mlflow

    run = mlflow.last_active_run()
    if run is None:
        return
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        from databricks.sdk.runtime import dbutils

        dbutils.jobs.taskValues.set(key="run_id", value=run.info.run_id)
    logger.info("%s: run %s", entry_point, run.info.run_id)


def main() -> None:
    if len(sys.argv) < 2 or not (PROJECT_DIR / "steps" / f"{sys.argv[1]}.py").is_file():
        sys.exit("usage: run_step.py <entry point> [arguments]; the entry point names steps/*.py")
    entry_point = sys.argv[1]
    sys.argv = [f"steps/{entry_point}.py", *sys.argv[2:]]
    try:
        runpy.run_module(f"steps.{entry_point}", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        # The step's exit code is the task's outcome; its run id is passed on only on success.
        if exit_.code in (0, None):
            _publish_run_id(entry_point)
        raise


if __name__ == "__main__":
    main()

"""The shared life cycle of one step run: open the run, do the work, keep the log, set the status.

Every step's command-line part calls `run_step`. The step's log is written to a file and logged
as an artifact of its run whatever happens, so a failure on a remote machine can still be read;
the error is also tagged on the run in one line, so `main` can say why a step failed. The process
exit code follows the outcome, because MLflow Projects sets the run status from it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import mlflow
import psutil

from llm_packager.third_party import silence_known_warnings

LOG_ARTIFACT_DIR = "logs"
ERROR_TAG = "llm_packager.error"
# One line a step leaves for `main` to print, e.g. why a model was not registered.
SUMMARY_TAG = "llm_packager.summary"
# When the step's process started and when its own work started and finished (epoch seconds), so
# the pipeline benchmark can split a step's wall time into start-up, work and bookkeeping.
STEP_TIMING_TAG = "llm_packager.timing.step"


class StepError(Exception):
    """A failure whose message says all a user needs; reported without a traceback."""


# Failures a user can fix from the message alone: reported in one line, without a traceback.
EXPECTED_ERRORS = (StepError, ValueError, ConnectionError, FileNotFoundError)
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(__name__)


def log_artifact_uri(run_id: str, entry_point: str) -> str:
    """Where a step run keeps its log."""
    return f"runs:/{run_id}/{LOG_ARTIFACT_DIR}/{entry_point}.log"


def _process_started() -> float:
    """When this process started (epoch seconds), to 10 ms."""
    try:
        # psutil derives this from the boot time, which /proc/stat gives in whole seconds.
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return psutil.Process().create_time()


def exit_process(exit_code: int) -> NoReturn:
    """End a step's process with ``exit_code``, without the slow part of interpreter shutdown.

    With torch and transformers loaded, tearing down the modules' objects at exit takes about
    0.7 s per step on this machine. Freezing the garbage collector first skips the collection of
    everything already allocated; atexit handlers (MLflow's flushes) still run.
    """
    gc.freeze()
    sys.exit(exit_code)


def run_step(entry_point: str, work: Callable[[str], None]) -> int:
    """Run ``work(run_id)`` inside the step's MLflow run.

    Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and is resumed; run directly
    with ``python -m steps.<name>``, a new run is started.

    Returns:
        The process exit code: 0 when the work finished, 1 when it raised.
    """
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT, force=True)
    silence_known_warnings()
    with tempfile.TemporaryDirectory(prefix=f"{entry_point}-log-") as log_dir:
        log_path = Path(log_dir) / f"{entry_point}.log"
        file_handler = logging.FileHandler(log_path)
        file_handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        logging.getLogger().addHandler(file_handler)
        run = mlflow.start_run()
        run_id = run.info.run_id
        status = "FINISHED"
        timing = {"process_started": _process_started(), "work_started": time.time()}
        try:
            logger.info("%s: run %s", entry_point, run_id)
            work(run_id)
        except EXPECTED_ERRORS as error:
            status = "FAILED"
            logger.error("%s failed: %s", entry_point, error)
            mlflow.set_tag(ERROR_TAG, " ".join(str(error).split())[:4000])
        except Exception as error:
            status = "FAILED"
            logger.exception("%s failed with an unexpected error", entry_point)
            mlflow.set_tag(ERROR_TAG, f"{type(error).__name__}: {error}"[:4000])
        finally:
            timing["work_finished"] = time.time()
            mlflow.set_tag(STEP_TIMING_TAG, json.dumps(timing))
            file_handler.flush()
            logging.getLogger().removeHandler(file_handler)
            file_handler.close()
            mlflow.log_artifact(str(log_path), LOG_ARTIFACT_DIR)
            mlflow.end_run(status=status)
    return 0 if status == "FINISHED" else 1


def run_command_line(
    entry_point: str,
    work: Callable[[Any, str], object],
    *,
    prepare: Callable[[Any], None] | None = None,
) -> NoReturn:
    """The command-line part of a step: parse its arguments with the parser its spec defines
    (``llm_packager.specs``), call ``prepare(parameters)`` if given (for what must happen before
    heavy imports), run ``work(parameters, run_id)`` in the step's run, and exit with the outcome.
    """
    from llm_packager.parameters import parse_arguments
    from llm_packager.specs import ENTRY_POINTS

    parameters = parse_arguments(ENTRY_POINTS[entry_point].parameters, sys.argv[1:])
    if prepare is not None:
        prepare(parameters)
    exit_process(run_step(entry_point, lambda run_id: work(parameters, run_id)))

"""The shared life cycle of one step run: open the run, do the work, keep the log, set the status.

Every step's command-line part calls `run_step`. The step's log is written to a local file and
logged as an artifact of its run whatever happens, so a failure on a remote machine can still be
read; the error is also tagged on the run in one line, so `main` can say why a step failed. When
the tracking server is gone, the log stays on disk and its path is printed. The process exit code
follows the outcome, because MLflow Projects sets the run status from it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import mlflow
import psutil
from mlflow.exceptions import MlflowException

from llm_packager.errors import UserError, is_server_unreachable, one_line
from llm_packager.keys import (
    ERROR_TAG,
    HOST_TAG,
    LOCAL_LOG_TAG,
    LOG_ARTIFACT_DIR,
    PEAK_RSS_CHILDREN_METRIC,
    PEAK_RSS_METRIC,
    PID_TAG,
    STEP_TIMING_TAG,
    step_log_artifact,
)
from llm_packager.models.model_store import RUNS_PAGE_SIZE, all_pages, has_status
from llm_packager.third_party import silence_known_warnings

# Exit code of a step that failed and could not tell the tracking server: main, which launched
# it, then knows not to ask the server about the run.
EXIT_SERVER_UNREACHABLE = 3


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(__name__)


def log_artifact_uri(run_id: str, entry_point: str) -> str:
    """Where a step run keeps its log."""
    return f"runs:/{run_id}/{step_log_artifact(entry_point)}"


def _process_started() -> float:
    """When this process started (epoch seconds), to 10 ms."""
    try:
        # psutil derives this from the boot time, which /proc/stat gives in whole seconds.
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return psutil.Process().create_time()


def peak_memory_mib() -> dict[str, float]:
    """This process's peak resident memory (VmHWM) and the largest peak of any child process it
    waited for (the evaluate workers, the model builder), in MiB: how much memory the step needed.
    """
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {PEAK_RSS_METRIC: own / 1024, PEAK_RSS_CHILDREN_METRIC: children / 1024}


def exit_process(exit_code: int) -> NoReturn:
    """End a step's process with ``exit_code``, without the slow part of interpreter shutdown.

    With torch and transformers loaded, tearing down the modules' objects at exit takes about
    0.7 s per step on this machine. Freezing the garbage collector first skips the collection of
    everything already allocated; atexit handlers (MLflow's flushes) still run, except after the
    tracking server stopped answering: MLflow's handler would end the run there, and wait through
    every retry again for a server that is gone.
    """
    gc.freeze()
    if exit_code == EXIT_SERVER_UNREACHABLE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_SERVER_UNREACHABLE)
    sys.exit(exit_code)


def local_log_folder() -> Path:
    """Where step logs are written first: kept there when they cannot reach the tracking server."""
    from llm_packager.sources.upstream import cache_root

    return cache_root() / "logs"


def _record_outcome(entry_point: str, status: str, message: str | None, timing: dict,
                    log_path: Path) -> tuple[bool, bool]:  # fmt: skip
    """Tag the outcome, upload the log and end the run.

    Returns:
        Whether the run was ended, and whether the log was uploaded. A log the server would not
        take (its artifact store full, say) stays on disk, and its path is tagged on the run.
    """
    uploaded = True
    try:
        if message is not None:
            mlflow.set_tag(ERROR_TAG, message[:4000])
        mlflow.set_tag(STEP_TIMING_TAG, json.dumps(timing))
        mlflow.log_metrics(peak_memory_mib())
        try:
            mlflow.log_artifact(str(log_path), LOG_ARTIFACT_DIR)
        except Exception as error:  # the run must still end, with the failure that caused it
            uploaded = False
            logger.error("%s: could not upload the step log (%s)", entry_point,
                         one_line(error) or f"{type(error).__name__}: {error}")  # fmt: skip
            if not is_server_unreachable(error):
                mlflow.set_tag(LOCAL_LOG_TAG, f"{socket.gethostname()}:{log_path}")
        mlflow.end_run(status=status)
    except Exception as error:  # the outcome must never hide the failure that caused it
        logger.error(
            "%s: could not record the outcome on the tracking server (%s)",
            entry_point, one_line(error) or f"{type(error).__name__}: {error}",
        )  # fmt: skip
        return False, False
    return True, uploaded


def run_step(entry_point: str, work: Callable[[str], None]) -> int:
    """Run ``work(run_id)`` inside the step's MLflow run.

    Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and is resumed; run directly
    with ``python -m steps.<name>``, a new run is started. A failure the user can fix is told in
    one line (``llm_packager.errors``); any other keeps its traceback in the step log. The log is
    written on local disk first and uploaded as the run's artifact; when the tracking server cannot
    take it, it stays on disk and the path is printed.

    Returns:
        The process exit code: 0 when the work finished, 1 when it raised, and
        `EXIT_SERVER_UNREACHABLE` when the outcome could not be recorded.
    """
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT, force=True)
    silence_known_warnings()
    # A folder per step process, so the file keeps the name the run's artifact has.
    log_folder = (
        local_log_folder() / f"{entry_point}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    log_folder.mkdir(parents=True, exist_ok=True)
    log_path = log_folder / f"{entry_point}.log"
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.getLogger().addHandler(file_handler)
    timing = {"process_started": _process_started(), "work_started": time.time()}
    status, message, reachable = "FINISHED", None, True
    try:
        run_id = mlflow.start_run().info.run_id
        # Who runs it: a run left RUNNING by a process that is gone is found by these.
        mlflow.set_tags({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
        logger.info("%s: run %s", entry_point, run_id)
        work(run_id)
    except Exception as error:
        status = "FAILED"
        message = one_line(error)
        reachable = not is_server_unreachable(error)
        if isinstance(error, UserError):
            logger.error("%s failed: %s", entry_point, message)
        else:
            # Not deliberate: the traceback goes to the log even when the message says it all.
            logger.error("%s failed: %s", entry_point, message or "an unexpected error",
                         exc_info=error)  # fmt: skip
            message = message or f"{type(error).__name__}: {error}"
    finally:
        timing["work_finished"] = time.time()
        file_handler.flush()
        ended, uploaded = (
            _record_outcome(entry_point, status, message, timing, log_path)
            if reachable
            else (False, False)
        )
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()
    if uploaded:
        shutil.rmtree(log_folder, ignore_errors=True)
    else:
        print(f"{entry_point}: the step log is kept at {log_path}", file=sys.stderr)
    if not ended:
        return EXIT_SERVER_UNREACHABLE
    return 0 if status == "FINISHED" else 1


def run_command_line(
    entry_point: str,
    work: Callable[[Any, str], object],
    *,
    prepare: Callable[[Any], None] | None = None,
) -> NoReturn:
    """The command-line part of a step: parse its arguments with the parser its spec defines
    (``llm_packager.config.specs``), call ``prepare(parameters)`` if given (for what must happen
    before
    heavy imports), run ``work(parameters, run_id)`` in the step's run, and exit with the outcome.
    """
    from llm_packager.config.parameters import parse_arguments
    from llm_packager.config.specs import ENTRY_POINTS

    parameters = parse_arguments(ENTRY_POINTS[entry_point].parameters, sys.argv[1:])
    if prepare is not None:
        prepare(parameters)
    exit_process(run_step(entry_point, lambda run_id: work(parameters, run_id)))


# A tracking URI of Azure ML's own server (azureml-mlflow's scheme), whose documentation says
# run searches cannot filter on `attributes.status`.
_AZUREML_SCHEME = "azureml:"


def _runs_matching(client, experiment_id: str, filter_string: str) -> list | None:
    """Every run of the experiment matching ``filter_string``; None where the server refuses a
    filter on status (Azure ML: refused by its documentation, or answered 400)."""
    if "attributes.status" in filter_string and str(client.tracking_uri).startswith(
        _AZUREML_SCHEME
    ):
        return None
    try:
        return list(all_pages(client.search_runs, RUNS_PAGE_SIZE, experiment_ids=[experiment_id],
                              filter_string=filter_string))  # fmt: skip
    except MlflowException as error:
        if "attributes.status" in filter_string and error.error_code in {
            "INVALID_PARAMETER_VALUE",
            "BAD_REQUEST",
        }:
            return None
        raise


def fail_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Mark FAILED the runs of this machine left RUNNING by a process that is gone (killed, or cut
    off from the tracking server), so no run stays RUNNING for ever; return their ids.

    A run counts as orphaned when the process that tagged it (``llm_packager.pid`` on this
    host) no longer exists, or the pid now belongs to a process started after the run.
    """
    host = socket.gethostname()
    # Listed in full before any is ended: a page token may count from the start of the results,
    # which ending a run would shift. The status is compared on the runs returned, in any casing.
    of_host = f"tags.`{HOST_TAG}` = '{host}'"
    running = _runs_matching(client, experiment_id, f"attributes.status = 'RUNNING' and {of_host}")
    if running is None:
        # Azure ML's tracking server does not support `attributes.status` in a filter: list the
        # host's runs instead, which grows with the experiment's history, paged.
        running = _runs_matching(client, experiment_id, of_host)
    running = [run for run in running if has_status(run, "RUNNING")]
    orphaned = []
    for run in running:
        pid = int(run.data.tags.get(PID_TAG, "0"))
        try:
            alive = psutil.Process(pid).create_time() <= run.info.start_time / 1000 + 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            alive = False
        if alive:
            continue
        client.set_tag(
            run.info.run_id, ERROR_TAG,
            f"orphaned: process {pid} on {host} ended without finishing this run",
        )  # fmt: skip
        client.set_terminated(run.info.run_id, status="FAILED")
        orphaned.append(run.info.run_id)
        logger.warning("Marked run %s FAILED: its process %d is gone", run.info.run_id, pid)
    return orphaned

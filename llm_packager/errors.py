"""Which failures are the user's to fix, and how a failure is told.

A `UserError` is deliberate: the code detected a condition the user can fix from the message
alone (a bad value, a missing file, an unreachable Hub), so it is reported in one line. Every other
exception keeps its traceback in the step log. Two conditions that are not bugs are also told in
one line wherever they arise: the disk being full or not writable, and the tracking server being
unreachable.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


class UserError(Exception):
    """A failure whose message says all a user needs to fix it; told without a traceback."""


class InvalidParametersError(UserError, ValueError):
    """A step was given parameters that do not fit together."""


class TrackingServerUnreachableError(UserError, ConnectionError):
    """The tracking server did not answer within the retry budget."""


def tracking_uri() -> str:
    """The tracking URI in use, for messages."""
    import mlflow

    return mlflow.get_tracking_uri()


def is_server_unreachable(error: BaseException) -> bool:
    """Whether an exception, or one that caused it, is the tracking server not answering:
    a refused or dropped connection or a timeout after MLflow's retries. An artifact request
    whose connection a server that still answers kept dropping is not
    (`server_dropped_artifact_request`)."""
    import requests

    if any(isinstance(seen, TrackingServerUnreachableError) for seen in _chain(error)):
        return True
    if server_dropped_artifact_request(error):
        return False
    for seen in _chain(error):
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        # MLflow wraps the requests error in an MlflowException that keeps only its text. A
        # server that answered 5xx to every retry is reachable: `server_kept_failing` says so.
        text = str(seen)
        if (
            "API request to" in text
            and ("Max retries exceeded" in text or "timed out" in text)
            and "error responses" not in text
        ):
            return True
    return False


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


_FAILING_STATUS = re.compile(r"API request to (\S+) failed .*too many (\d{3}) error responses")


def server_kept_failing(error: BaseException) -> tuple[str, str] | None:
    """The URL and HTTP status, if the tracking server answered an error status to every retry
    of one request (urllib3 then keeps neither the answer's body nor the server's reason)."""
    for seen in _chain(error):
        if match := _FAILING_STATUS.search(str(seen)):
            return match.group(1), match.group(2)
    return None


# urllib3's last reason when every retry of an artifact request lost its connection mid-request
# (mlflow/utils/rest_utils.py words the failure; urllib3 names the reason).
_DROPPED_ARTIFACT_REQUEST = re.compile(
    r"API request to ((\S+?)/api/2\.0/mlflow-artifacts/artifacts/\S+) failed with exception .*"
    r"Max retries exceeded.*Connection aborted"
)
_DROPPED_FOUND = "_llm_packager_dropped_artifact_request"


def server_dropped_artifact_request(error: BaseException) -> str | None:
    """The artifact's URL, if every retry of an artifact upload or download lost its connection
    while the server that holds the artifacts still answers its health check.

    A server that cannot write an upload (its artifact store full, say) can give up on the
    connection before it has read the whole body, and the client, still sending, sees it reset
    instead of an answer: MLflow's server did so with a full tmpfs now and then, where it usually
    answers 500. The server is up, so this is told as the artifact's failure, not as the server
    gone. Worked out once per exception (the health check is a request), then kept on it.
    """
    if hasattr(error, _DROPPED_FOUND):
        return getattr(error, _DROPPED_FOUND)
    found = None
    for seen in _chain(error):
        if match := _DROPPED_ARTIFACT_REQUEST.search(str(seen)):
            found = match.group(1) if _server_answers(match.group(2)) else None
            break
    setattr(error, _DROPPED_FOUND, found)
    return found


def _server_answers(base_url: str) -> bool:
    """Whether the server at ``base_url`` answers its /health now, asked once, with MLflow's own
    credentials and TLS settings for it."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        answer = http_request(get_default_host_creds(base_url), "/health", "GET", max_retries=0,
                              timeout=5, raise_on_status=False)  # fmt: skip
    except Exception:  # any failure to get an answer is no answer
        return False
    return answer.ok


def _artifact_failure(url: str, what: str, causes: str) -> str:
    artifact = url.split("/mlflow-artifacts/artifacts/", 1)[1]
    return (
        f"The tracking server {tracking_uri()} could not store or serve the artifact {artifact}: "
        f"it {what} to every retry. {causes}, and the server's log says which; fix it and rerun "
        "(a rerun reuses every step that finished)"
    )


def _server_disk_full(error: BaseException) -> bool:
    return any(
        "No space left on device" in str(seen) and not isinstance(seen, OSError)
        for seen in _chain(error)
    )


def one_line(error: BaseException) -> str | None:
    """The one-line account of a failure that needs no traceback, or None for one that does."""
    if isinstance(error, UserError):
        return " ".join(str(error).split())
    if is_server_unreachable(error):
        return (
            f"The tracking server {tracking_uri()} cannot be reached (no answer after MLflow's "
            "retries). Start it again, or check MLFLOW_TRACKING_URI; a rerun reuses every step "
            "that finished"
        )
    if dropped := server_dropped_artifact_request(error):
        return _artifact_failure(
            dropped, "closed the connection mid-request",
            "A full or unwritable artifact store (on an upload), a proxy's size limit or a "
            "server worker that crashed is the usual cause",
        )  # fmt: skip
    if failing := server_kept_failing(error):
        url, status = failing
        if "/mlflow-artifacts/artifacts/" in url:
            return _artifact_failure(
                url, f"answered HTTP {status}",
                "A full or unwritable artifact store is the usual cause",
            )  # fmt: skip
        return (
            f"The tracking server {tracking_uri()} answered HTTP {status} to every retry of "
            f"{url}; the server's log says why"
        )
    if _server_disk_full(error):
        return (
            f"The tracking server {tracking_uri()} could not store an artifact: its artifact "
            "store is full (No space left on device). Free space there and rerun"
        )
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        where = f" writing {error.filename}" if error.filename else ""
        return f"The disk is full{where} ({os.strerror(error.errno)}); free space and rerun"
    if isinstance(error, OSError) and error.errno in _NOT_ALLOWED:
        where = f" to {error.filename}" if error.filename else ""
        return f"Permission denied{where} ({os.strerror(error.errno)})"
    return None


# How many tracking requests wait for a server that went away, one after the other: the call a
# step (or main) is making, then the outer `mlflow run` asking for main's run status once main has
# exited (`_maybe_set_run_terminated` in mlflow/projects/__init__.py: a get_run, whose failure
# ends the command). Nothing of ours calls the server again after a call found it gone: the step
# and main skip recording their outcome and exit without MLflow's atexit handlers
# (llm_packager/pipeline/step_run.py), and main skips recording its progress (steps/main.py).
REQUESTS_IN_TURN = 2
# MLflow's and urllib3's own limits (mlflow/environment_variables.py, mlflow/utils/rest_utils.py,
# urllib3.util.Retry): at most 10 retries; before retry n (n >= 2) a sleep of factor * 2**(n-1)
# s, capped at 120 s, plus up to MLFLOW_HTTP_REQUEST_BACKOFF_JITTER s; each attempt waits up to
# MLFLOW_HTTP_REQUEST_TIMEOUT s (MLflow's default: 120) for an answer.
_MAX_RETRIES = 10
_MAX_BACKOFF_S = 120
_BACKOFF_FACTOR = 2
_JITTER_S = 1
_MAX_TIMEOUT_S = 120
# A loaded server's slow answer is not an outage: retries are added only while each attempt can
# still wait this long for its answer.
_MIN_TIMEOUT_S = 5


def backoff_seconds(retries: int) -> float:
    """The longest MLflow sleeps, jitter included, between the attempts of one request that is
    retried ``retries`` times (urllib3 does not sleep before the first retry)."""
    return sum(
        min(_BACKOFF_FACTOR * 2 ** (attempt - 1), _MAX_BACKOFF_S) + _JITTER_S
        for attempt in range(2, retries + 1)
    )


def bound_tracking_retries(budget_seconds: int) -> dict[str, str]:
    """MLflow HTTP settings under which the user's `mlflow run` command gives up within
    ``budget_seconds`` (`tracking.server_timeout_s`) of the tracking server going away for good,
    besides the time the running step spends before its next call and the processes' exit.

    `REQUESTS_IN_TURN` requests wait for a gone server one after the other, so each gets that
    share of the budget, its worst case counted in full: every sleep with its jitter, and every
    attempt waiting the whole timeout (a server whose host is gone answers nothing; a stopped
    server refuses at once, and then only the sleeps count). Retries take at most half of the
    share, as many as leave each attempt `_MIN_TIMEOUT_S` to answer, and at least one. The
    default budget of 300 s gives 5 retries (a stopped server that is back within a minute is
    ridden out) and 14 s per answer.

    Returns:
        The environment variables to set: MLflow reads them on every request, and the steps and
        the outer `mlflow run` (which reads none of our settings) inherit them.
    """
    share = max(1, budget_seconds // REQUESTS_IN_TURN)
    retries = 1
    while retries < _MAX_RETRIES:
        more = retries + 1
        sleeps = backoff_seconds(more)
        if sleeps > share / 2 or (share - sleeps) // (more + 1) < _MIN_TIMEOUT_S:
            break
        retries = more
    timeout = int(max(1, min(_MAX_TIMEOUT_S, (share - backoff_seconds(retries)) // (retries + 1))))
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(_BACKOFF_FACTOR),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": str(_JITTER_S),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        # A Databricks tracking URI goes through databricks-sdk, which retries a call until this
        # deadline (MLflow's default: 500 s; mlflow/utils/rest_utils.py passes it as the SDK's
        # retry_timeout_seconds), each attempt waiting up to the timeout above: the last attempt
        # may start just before the deadline.
        "MLFLOW_DATABRICKS_ENDPOINT_HTTP_RETRY_TIMEOUT": str(max(1, share - timeout)),
    }


def tracking_exports(budget_seconds: int) -> str:
    """The shell line that exports `bound_tracking_retries(budget_seconds)`, for the user to run
    before `mlflow run` (README.md; ``python -m llm_packager.errors <seconds>`` prints it)."""
    settings = bound_tracking_retries(budget_seconds)
    return "export " + " ".join(f"{name}={value}" for name, value in settings.items())


def lost_insert_race(error: BaseException) -> bool:
    """Whether a tracking-server call failed because a concurrent call inserted the same row first.

    MLflow's SQL store upserts tags, aliases and datasets as "select, then insert if missing", so
    two pipelines writing the same key at once can both try the insert; the loser's write is then
    safe to repeat, because the row it wanted now exists and is updated instead. SQLite and
    PostgreSQL say "unique constraint", MySQL "Duplicate entry".
    """
    text = str(error).lower()
    return "unique constraint" in text or "duplicate entry" in text


def retry_after_insert_race(what: str, write: Callable[..., object], *args: object) -> None:
    """Call an idempotent tracking write, ``write(*args)``, once more if a concurrent writer won
    the insert; ``what`` names the written thing in the log."""
    from mlflow.exceptions import MlflowException

    try:
        write(*args)
    except MlflowException as error:
        if not lost_insert_race(error):
            raise
        logger.info("%s was written concurrently by another run; writing again", what)
        write(*args)


if __name__ == "__main__":
    import sys

    print(tracking_exports(int(sys.argv[1])))

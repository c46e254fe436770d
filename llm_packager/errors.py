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
from collections.abc import Callable

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
    a refused or dropped connection or a timeout after MLflow's retries."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(
            seen,
            TrackingServerUnreachableError
            | requests.exceptions.ConnectionError
            | requests.exceptions.Timeout,
        ):
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
        seen = seen.__cause__ or seen.__context__
    return False


_FAILING_STATUS = re.compile(r"API request to (\S+) failed .*too many (\d{3}) error responses")


def server_kept_failing(error: BaseException) -> tuple[str, str] | None:
    """The URL and HTTP status, if the tracking server answered an error status to every retry
    of one request (urllib3 then keeps neither the answer's body nor the server's reason)."""
    seen: BaseException | None = error
    while seen is not None:
        if match := _FAILING_STATUS.search(str(seen)):
            return match.group(1), match.group(2)
        seen = seen.__cause__ or seen.__context__
    return None


def _server_disk_full(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        if "No space left on device" in text and not isinstance(seen, OSError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
    if failing := server_kept_failing(error):
        url, status = failing
        if "/mlflow-artifacts/artifacts/" in url:
            stored = url.split("/mlflow-artifacts/artifacts/", 1)[1]
            return (
                f"The tracking server {tracking_uri()} could not store the artifact {stored}: it "
                f"answered HTTP {status} to every retry. A full or unwritable artifact store is "
                "the usual cause, and the server's log says which; fix it and rerun (a rerun "
                "reuses every step that finished)"
            )
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


def bound_tracking_retries(budget_seconds: int) -> dict[str, str]:
    """MLflow HTTP settings under which one tracking request gives up within ``budget_seconds``.

    MLflow retries a failed request with exponential backoff (4, 8, 16 ... s, at most 120 s)
    and waits up to 120 s for each answer, so by default a server that stays away keeps a
    process waiting for many minutes per request. Here the wait per answer is a quarter of the
    budget (at most 30 s) and the retries are as many as fit: the default budget of 300 s gives 5
    retries, which ride out an outage of about a minute.

    Returns:
        The environment variables to set (MLflow reads them on every request).
    """
    timeout = max(1, min(30, budget_seconds // 4))
    retries, slept = 0, 0
    while True:
        pause = 0 if retries == 0 else min(2 * 2**retries, 120)
        if slept + pause + (retries + 2) * timeout > budget_seconds:
            break
        retries, slept = retries + 1, slept + pause
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
    }


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

"""What the pipeline does about stale inputs, abandoned staging folders and failures it must
tell honestly: the parts that need no tracking server (the fault tests in test_faults.py do)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import requests
from mlflow.exceptions import MlflowException

from llm_packager.config.compose import compose_config
from llm_packager.errors import (
    InvalidParametersError,
    TrackingServerUnreachableError,
    bound_tracking_retries,
    is_server_unreachable,
    one_line,
    retry_after_insert_race,
)
from llm_packager.pipeline.driver import plan_pipeline
from llm_packager.sources.content_hash import content_digest
from llm_packager.sources.staging import remove_abandoned_staging, staging_folder
from llm_packager.sources.synthetic import build_synthetic_phi3
from tests.support import TINY_SPEC

PINNED_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _planned_fetch(model: str, overrides: str):
    (planned,) = plan_pipeline(compose_config(model, overrides), ["fetch_model"])
    return planned


def test_new_weights_at_the_same_local_path_change_the_fetch_parameters(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    overrides = f"model.source=local model.local_dir={folder}"
    before = _planned_fetch("phi3-mini-4k-instruct", overrides)
    assert before.values["content_sha256"] == content_digest(folder)
    assert _planned_fetch("phi3-mini-4k-instruct", overrides).values == before.values

    # Other weights of the same shape copied over the old ones, as a retrained model would be.
    retrained = build_synthetic_phi3(replace(TINY_SPEC, seed=1), tmp_path / "retrained")
    shutil.copy(retrained / "model.safetensors", folder / "model.safetensors")
    after = _planned_fetch("phi3-mini-4k-instruct", overrides)
    assert after.values["content_sha256"] != before.values["content_sha256"]
    assert after.reusable and before.reusable


def test_file_hashes_are_cached_by_size_and_mtime(tmp_path):
    # The documented limit of the cache, shown: a same-size edit with its mtime restored is not
    # seen (which proves the cached hash is used); touching the file makes it seen.
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    (folder / "config.json").write_text("{}")
    first = content_digest(folder)
    stat = weights.stat()
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_digest(folder) == first

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert content_digest(folder) != first


def test_an_unpinned_hub_revision_is_never_reused_and_a_pinned_one_is():
    unpinned = _planned_fetch(
        "phi3-mini-4k-instruct", "model.revision=main model.allow_unpinned_revision=true"
    )
    pinned = _planned_fetch("phi3-mini-4k-instruct", f"model.revision={PINNED_COMMIT}")
    assert (unpinned.reusable, pinned.reusable) == (False, True)


def test_staging_folders_of_ended_processes_are_removed_and_live_ones_kept(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    abandoned = tmp_path / f".download-{ended.stdout.strip()}-abc123"
    (abandoned / "partial").mkdir(parents=True)
    (abandoned / "partial" / "model.safetensors").write_bytes(b"half")
    live = staging_folder(tmp_path)
    finished = tmp_path / "finished-entry"
    finished.mkdir()

    assert remove_abandoned_staging(tmp_path) == [abandoned]
    assert not abandoned.exists()
    assert live.exists() and finished.exists()


def test_a_user_error_is_told_in_one_line():
    error = InvalidParametersError("agreement_tokens must be at least 0,\n  got -1")
    assert one_line(error) == "agreement_tokens must be at least 0, got -1"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, "The disk is full writing /data/model.onnx (No space left on device); "
                       "free space and rerun"),
        (errno.EDQUOT, "The disk is full writing /data/model.onnx (Disk quota exceeded); "
                       "free space and rerun"),
        (errno.EACCES, "Permission denied to /data/model.onnx (Permission denied)"),
        (errno.EROFS, "Permission denied to /data/model.onnx (Read-only file system)"),
    ],
)  # fmt: skip
def test_a_full_or_unwritable_disk_says_so(code, expected):
    assert one_line(OSError(code, os.strerror(code), "/data/model.onnx")) == expected


def test_an_unreachable_tracking_server_is_named_through_mlflows_wrapping(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    refused = requests.exceptions.ConnectionError("Connection refused")
    # MLflow wraps the requests error in an MlflowException that keeps only its text.
    wrapped = MlflowException(
        "API request to http://127.0.0.1:9/api/2.0/mlflow/runs/get failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded"
    )
    assert is_server_unreachable(wrapped) and is_server_unreachable(refused)
    assert one_line(wrapped).startswith("The tracking server http://127.0.0.1:9 cannot be reached")
    assert is_server_unreachable(TrackingServerUnreachableError("gone"))


def test_a_full_artifact_store_on_the_server_says_so(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    error = MlflowException("API request failed: [Errno 28] No space left on device: '/srv/a'")
    assert one_line(error).startswith(
        "The tracking server http://127.0.0.1:9 could not store an artifact: its artifact store "
        "is full"
    )


@pytest.mark.parametrize(
    "error",
    [ValueError("bad value"), FileNotFoundError(errno.ENOENT, "No such file", "x"),
     ConnectionError("reset"), KeyError("model_size_bytes")],
    ids=["ValueError", "FileNotFoundError", "ConnectionError", "KeyError"],
)  # fmt: skip
def test_other_errors_keep_their_traceback(error):
    assert one_line(error) is None


@pytest.mark.parametrize("budget", [20, 60, 300, 900])
def test_bounded_tracking_retries_fit_the_budget(budget):
    settings = bound_tracking_retries(budget)
    retries = int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    timeout = int(settings["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    factor = int(settings["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    # urllib3 sleeps factor * 2**(n-1) before retry n (n >= 2), capped at 120 s, MLflow adds up
    # to 1 s of jitter to each sleep, and each of the retries + 1 attempts may wait `timeout` for
    # an answer.
    sleeps = sum(min(factor * 2 ** (attempt - 1), 120) + 1 for attempt in range(2, retries + 1))
    assert sleeps + (retries + 1) * timeout <= budget
    assert retries >= 1 and timeout >= 1


# What the tracking server answered when two pipelines tagged the same model version at once.
_LOST_INSERT = (
    "BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: model_version_tags.workspace,"
    " model_version_tags.key, model_version_tags.name, model_version_tags.version"
)


def test_a_write_that_lost_an_insert_race_is_repeated_once_and_other_errors_are_not():
    calls = []

    def tag(key, value, fails_with):
        calls.append((key, value))
        if len(calls) <= len(fails_with):
            raise MlflowException(fails_with[len(calls) - 1])

    retry_after_insert_race("a tag", tag, "k", "v", [_LOST_INSERT])
    assert calls == [("k", "v"), ("k", "v")]

    calls.clear()
    with pytest.raises(MlflowException, match="UNIQUE"):
        retry_after_insert_race("a tag", tag, "k", "v", [_LOST_INSERT, _LOST_INSERT])
    assert len(calls) == 2

    calls.clear()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        retry_after_insert_race("a tag", tag, "k", "v", ["RESOURCE_DOES_NOT_EXIST: no version 9"])
    assert len(calls) == 1

"""Commit-pinned downloads from the Hugging Face Hub that fail fast when the Hub is unreachable.

`huggingface_hub` retries an unreachable Hub for about 25 s before giving up, and then says only
"check your internet connection". Here a pinned snapshot already in the local cache is used as is,
and otherwise one short TCP probe decides within seconds whether a download can work at all; the
error then names the offline alternatives. Every downloaded file is checked against the sha256
(LFS files) or git blob id (small files) that the Hub reports for that commit.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from llm_packager.errors import UserError
from llm_packager.sources.manifest import ModelFilesError, sha256_of_file

_COMMIT_PATTERN = re.compile(r"[0-9a-f]{40}")
_PROBE_TIMEOUT_SECONDS = 5.0
OFFLINE_FIX = (
    "Offline, use the synthetic model (-P model=tiny-random-phi3) or a model folder already on "
    'disk (-P overrides="model.source=local model.local_dir=/path/to/hf-model").'
)


class HubUnreachableError(UserError, ConnectionError):
    """The Hugging Face Hub cannot be reached and the snapshot is not in the local cache."""


class UnpinnedRevisionError(UserError, ValueError):
    """A branch or tag name was given where a commit is required."""


@dataclass(frozen=True)
class Snapshot:
    """A downloaded snapshot: where it lies and the commit it is."""

    folder: Path
    commit: str


def is_commit(revision: str) -> bool:
    """True for a full 40-hex git commit id (a short id can become ambiguous later)."""
    return bool(_COMMIT_PATTERN.fullmatch(revision))


def require_pinned_revision(repo_id: str, revision: str, *, allow_unpinned: bool) -> None:
    """Refuse branch and tag names unless the user opted in.

    Raises:
        UnpinnedRevisionError: naming the repo, the revision and the switch that allows it.
    """
    if not revision:
        raise UnpinnedRevisionError(f"{repo_id}: a revision (a 40-hex commit id) is required")
    if not is_commit(revision) and not allow_unpinned:
        raise UnpinnedRevisionError(
            f"{repo_id}: revision '{revision}' is not a 40-hex commit id; pin a commit, "
            "or set model.allow_unpinned_revision=true to accept a moving branch or tag"
        )


def hub_endpoint() -> str:
    """The Hub address huggingface_hub will use (HF_ENDPOINT, else the public Hub)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def probe_hub(endpoint: str, timeout: float = _PROBE_TIMEOUT_SECONDS) -> None:
    """Open and close one TCP connection to the Hub.

    Raises:
        HubUnreachableError: within `timeout` seconds when name resolution or connecting fails.
    """
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as error:
        raise HubUnreachableError(
            f"Cannot reach the Hugging Face Hub at {endpoint} ({error}). {OFFLINE_FIX}"
        ) from error


def _git_blob_id(path: Path) -> str:
    # The Hub reports small (non-LFS) files by their git blob id: sha1 of "blob <size>\0<bytes>".
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"blob {path.stat().st_size}\0".encode())
    digest.update(path.read_bytes())
    return digest.hexdigest()


def _matches(path: str, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def download_pinned_snapshot(
    repo_id: str,
    revision: str,
    allow_patterns: list[str],
    *,
    allow_unpinned: bool = False,
) -> Snapshot:
    """Download (or reuse from the local cache) the files of one Hub commit and verify them.

    Args:
        repo_id: Hub model repository, e.g. ``microsoft/Phi-3-mini-4k-instruct``.
        revision: a 40-hex commit id; a branch or tag only with ``allow_unpinned``.
        allow_patterns: glob patterns of the files to fetch (all files when empty).
        allow_unpinned: accept a branch or tag name; the commit it resolves to is returned.

    Raises:
        UnpinnedRevisionError: the revision is not a commit and unpinned revisions are not allowed.
        HubUnreachableError: the Hub cannot be reached and the snapshot is not cached.
        ModelFilesError: a downloaded file does not match what the Hub reports for that commit.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    require_pinned_revision(repo_id, revision, allow_unpinned=allow_unpinned)
    patterns = list(allow_patterns)
    if is_commit(revision):
        try:
            folder = snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns or None, local_files_only=True
            )
            return Snapshot(Path(folder), revision)
        except LocalEntryNotFoundError:
            pass  # not cached yet: download below
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        raise HubUnreachableError(
            f"{repo_id}@{revision} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            f"set. {OFFLINE_FIX}"
        )
    probe_hub(hub_endpoint())
    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    folder = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns or None))
    for sibling in info.siblings or []:
        if not _matches(sibling.rfilename, patterns):
            continue
        local = folder / sibling.rfilename
        if not local.is_file():
            raise ModelFilesError(f"{repo_id}@{info.sha}: {sibling.rfilename} was not downloaded")
        if sibling.lfs is not None:
            if sha256_of_file(local) != sibling.lfs.sha256:
                raise ModelFilesError(f"{repo_id}@{info.sha}: {sibling.rfilename} fails its sha256")
        elif sibling.blob_id and _git_blob_id(local) != sibling.blob_id:
            raise ModelFilesError(f"{repo_id}@{info.sha}: {sibling.rfilename} fails its blob id")
    return Snapshot(folder, info.sha)

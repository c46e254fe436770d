"""Content digests of model files on this machine, for the reuse key of a local model.

A local folder's path says nothing about what is in it: new weights copied to the same path must
make a new fetch_model run. Hashing a 7.6 GB model on every ``main`` would take a minute or more,
so each file's sha256 is cached by its path, size and modification time (``file-hashes.json`` in
the cache). A file changed in place without changing its size or modification time (restored
timestamps, say) is not noticed; touch it, or pass ``-P force=fetch_model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from llm_packager.sources.manifest import model_files, sha256_of_file

_CACHE_NAME = "file-hashes.json"


def _cache_file() -> Path:
    from llm_packager.sources.upstream import cache_root

    return cache_root() / _CACHE_NAME


def _load(path: Path) -> dict[str, list]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, entries: dict[str, list]) -> None:
    # Written whole and renamed into place: a concurrent reader sees the old file or the new one.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".file-hashes-", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        json.dump(entries, stream)
    os.replace(temporary, path)


def content_digest(path: Path) -> str:
    """A sha256 over every model file under ``path`` (or of the file ``path``) and its relative
    name, each file's hash taken from the cache while its size and mtime are unchanged."""
    path = path.expanduser().resolve()
    files = [path] if path.is_file() else model_files(path)
    cache_file = _cache_file()
    cache = _load(cache_file)
    digest = hashlib.sha256()
    changed = False
    for file in files:
        stat = file.stat()
        key = str(file)
        cached = cache.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            file_hash = cached[2]
        else:
            file_hash = sha256_of_file(file)
            cache[key] = [stat.st_size, stat.st_mtime_ns, file_hash]
            changed = True
        name = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{file_hash}\n".encode())
    if changed:
        _save(cache_file, cache)
    return digest.hexdigest()

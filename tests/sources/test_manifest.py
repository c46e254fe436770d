"""Manifests, and the refusal of LFS pointers, empty and truncated weight files."""

from __future__ import annotations

import shutil

import pytest

from llm_packager.sources.manifest import (
    ModelFilesError,
    build_manifest,
    check_model_files,
    count_safetensors_parameters,
    read_manifest,
    verify_manifest,
    write_manifest,
)

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\n"
    "size 2669692552\n"
)


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_manifest_round_trips_and_verifies(model_copy, tmp_path):
    entries = build_manifest(model_copy, show_progress=False)
    assert {entry.path for entry in entries} >= {"config.json", "model.safetensors"}
    path = write_manifest(entries, tmp_path / "manifest.json")
    assert read_manifest(path) == sorted(entries, key=lambda entry: entry.path)
    verify_manifest(model_copy, read_manifest(path))


def test_verify_names_a_changed_file(model_copy):
    entries = build_manifest(model_copy, show_progress=False)
    config = model_copy / "config.json"
    config.write_text(config.read_text().replace("64", "65", 1))
    with pytest.raises(ModelFilesError, match=r"^config\.json: s(ize|ha256) .*manifest"):
        verify_manifest(model_copy, entries)


def test_verify_names_a_missing_file(model_copy):
    entries = build_manifest(model_copy, show_progress=False)
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelFilesError, match=r"is missing 1 file\(s\), first: tokenizer\.json$"):
        verify_manifest(model_copy, entries)


def test_lfs_pointer_is_refused(model_copy):
    (model_copy / "model.safetensors").write_text(LFS_POINTER)
    with pytest.raises(ModelFilesError, match=r"^model\.safetensors in .* is a Git-LFS pointer"):
        check_model_files(model_copy)


def test_empty_weight_file_is_refused(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFilesError, match=r"^Weight file model\.safetensors in .* is empty$"):
        check_model_files(model_copy)


def test_truncated_safetensors_is_refused(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(
        ModelFilesError, match=r"^Weight file model\.safetensors is truncated or padded"
    ):
        check_model_files(model_copy)


def test_empty_and_missing_folders_are_refused(tmp_path):
    with pytest.raises(ModelFilesError, match=r"^Model folder not found"):
        check_model_files(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFilesError, match=r"^Model folder is empty"):
        check_model_files(tmp_path / "empty")


def test_parameter_count_comes_from_the_headers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert count_safetensors_parameters(tiny_model_dir) == sum(
        p.numel() for p in model.parameters()
    )

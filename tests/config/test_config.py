"""Composing the real conf/ tree, and the one-line errors for bad configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from llm_packager.choices import ModelSource
from llm_packager.config.compose import (
    CONFIG_DIR,
    ConfigError,
    compose_config,
    config_hash,
    validate_config,
)
from llm_packager.config.parameters import as_mlflow_parameters, config_values
from llm_packager.config.specs import FetchModelParameters

MODEL_CHOICES = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODEL_CHOICES)
def test_every_model_choice_composes_into_valid_fetch_parameters(model):
    cfg = compose_config(model, "")
    parameters = as_mlflow_parameters(
        FetchModelParameters(**config_values(FetchModelParameters, cfg.model))
    )
    assert parameters["name"] == model
    assert parameters["source"] == cfg.model.source.value


def test_model_choices_cover_the_real_and_the_tiny_model():
    assert {"phi3-mini-4k-instruct", "tiny-random-phi3"} <= set(MODEL_CHOICES)


def test_default_config_pins_phi3_and_its_onnx_build_to_commits():
    cfg = compose_config("phi3-mini-4k-instruct", "")
    assert cfg.model.repo_id == "microsoft/Phi-3-mini-4k-instruct"
    assert len(cfg.model.revision) == 40
    assert cfg.onnx.repo_id == "microsoft/Phi-3-mini-4k-instruct-onnx"
    assert cfg.onnx.allow_patterns == ["cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/*"]
    assert len(cfg.onnx.revision) == 40


def test_overrides_string_is_split_like_a_shell():
    cfg = compose_config(
        "tiny-random-phi3", "model.num_hidden_layers=3 'model.name=tiny with spaces'"
    )
    assert cfg.model.num_hidden_layers == 3
    assert cfg.model.name == "tiny with spaces"


def test_config_hash_changes_with_the_config():
    assert config_hash(compose_config("tiny-random-phi3", "")) != config_hash(
        compose_config("tiny-random-phi3", "model.seed=1")
    )


@pytest.mark.parametrize(
    ("model", "overrides", "error"),
    [
        pytest.param("tiny-random-phi3", "model.no_such_key=1",
                     r"^Unknown config key 'model\.no_such_key' in overrides",
                     id="unknown-override-key-is-named"),
        pytest.param("tiny-random-phi3", "+model.no_such_key=1",
                     r"^Invalid config at 'model\.no_such_key'",
                     id="appended-unknown-key-is-rejected-by-the-schema"),
        pytest.param("tiny-random-phi3", "model.hidden_size=abc",
                     r"^Invalid config at 'model\.hidden_size': Value 'abc' of type 'str' could "
                     r"not be converted to Integer$",
                     id="bad-type-is-named"),
        pytest.param("tiny-random-phi3", "model.source=ftp",
                     r"^Invalid config at 'model\.source'", id="unknown-source-is-named"),
        pytest.param("tiny", "",
                     r"available: phi3-mini-4k-instruct, smollm2-135m-instruct, tiny-random-phi3$",
                     id="unknown-model-choice-lists-the-available-ones"),
        pytest.param("tiny-random-phi3", "model.name='unclosed", r"^Cannot split overrides",
                     id="unbalanced-quote-in-overrides-is-reported"),
    ],
)  # fmt: skip
def test_bad_configuration_fails_with_one_line_that_names_it(model, overrides, error):
    with pytest.raises(ConfigError, match=error):
        compose_config(model, overrides)


def test_branch_name_revision_is_rejected_unless_allowed():
    with pytest.raises(
        ConfigError,
        match=r"^model\.revision: microsoft/Phi-3-mini-4k-instruct: revision 'main' is not a "
        r"40-hex commit id; pin a commit, or set model\.allow_unpinned_revision=true",
    ):
        compose_config("phi3-mini-4k-instruct", "model.revision=main")
    allowed = compose_config(
        "phi3-mini-4k-instruct", "model.revision=main model.allow_unpinned_revision=true"
    )
    assert allowed.model.revision == "main"


def test_short_commit_is_not_a_pin():
    with pytest.raises(ConfigError, match="revision '0a67737' is not a 40-hex commit id"):
        compose_config("phi3-mini-4k-instruct", "model.revision=0a67737")


def test_missing_local_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(
        ConfigError, match=rf"^model\.local_dir: Model folder not found: {missing}$"
    ):
        compose_config("phi3-mini-4k-instruct", f"model.source=local model.local_dir={missing}")


def test_lfs_pointer_in_local_folder_is_named(tmp_path, tiny_model_dir):
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a8a2b7f4f0e0e1b9ad1b1c7ad0c3f3e5e0f0e1b9ad1b1c7ad0c3f3e5e0f0e\n"
        "size 7642181880\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"^model\.local_dir: model\.safetensors in .* is a Git-LFS pointer, not the file "
        r"itself: run `git lfs pull` in that clone",
    ):
        compose_config("phi3-mini-4k-instruct", f"model.source=local model.local_dir={folder}")


def test_local_folder_with_real_files_is_accepted(tiny_model_dir):
    cfg = compose_config(
        "phi3-mini-4k-instruct", f"model.source=local model.local_dir={tiny_model_dir}"
    )
    assert cfg.model.local_dir == str(Path(tiny_model_dir).resolve())


def test_synthetic_sizes_are_required_for_synthetic_and_refused_otherwise():
    cfg = compose_config("tiny-random-phi3", "")
    with open_dict(cfg):
        cfg.model.hidden_size = 0
    with pytest.raises(
        ConfigError, match=r"^model\.hidden_size must be set when model\.source=synthetic$"
    ):
        validate_config(cfg)
    cfg = compose_config("tiny-random-phi3", "")
    cfg.model.source = ModelSource.hub
    cfg.model.repo_id = "microsoft/Phi-3-mini-4k-instruct"
    cfg.model.revision = "0a67737cc96d2554230f90338b163bc6380a2a85"
    with pytest.raises(
        ConfigError, match=r"^model\.vocab_size is only used when model\.source=synthetic$"
    ):
        validate_config(cfg)


def test_an_architecture_the_builder_cannot_build_is_refused_at_config_time(
    tmp_path, tiny_model_dir
):
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "encoder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["BertForMaskedLM"]}))
    local = f"model.source=local model.local_dir={folder} model.architecture=''"
    with pytest.raises(
        ConfigError,
        match=r"^onnx\.source=build: the onnxruntime-genai \S+ model builder cannot build "
        r"BertForMaskedLM; it builds .*LlamaForCausalLM.* Use an ONNX build made for this model",
    ):
        compose_config("phi3-mini-4k-instruct", f"{local} onnx=build")
    with pytest.raises(ConfigError, match=r"^model\.architecture is LlamaForCausalLM, but the "
                                          r"model is BertForMaskedLM$"):  # fmt: skip
        compose_config("phi3-mini-4k-instruct",
                       f"{local} model.architecture=LlamaForCausalLM")  # fmt: skip


def test_the_published_onnx_build_belongs_to_phi3_and_other_models_get_a_build():
    assert compose_config("phi3-mini-4k-instruct", "").onnx.source.value == "prebuilt"
    for model in ("tiny-random-phi3", "smollm2-135m-instruct"):
        assert compose_config(model, "").onnx.source.value == "build"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("onnx.max_batch_size=0", r"^onnx\.max_batch_size must be 1 or more; got 0$"),
        ("onnx.max_queued_requests=0", r"^onnx\.max_queued_requests must be 1 or more; got 0$"),
        ("onnx.batch_wait_ms=-1", r"^onnx\.batch_wait_ms must be 0 or more; got -1$"),
    ],
)
def test_serving_bounds_must_be_positive(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config("tiny-random-phi3", override))

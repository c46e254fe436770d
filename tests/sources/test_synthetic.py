"""The synthetic Phi-3: a real Phi3ForCausalLM, deterministic, with a byte-level BPE tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_packager.sources.manifest import build_manifest
from llm_packager.sources.synthetic import SPECIAL_TOKENS, build_synthetic_phi3
from tests.support import TINY_SPEC


def test_same_spec_gives_identical_files(tmp_path, tiny_model_dir):
    again = build_synthetic_phi3(TINY_SPEC, tmp_path / "again")
    assert build_manifest(again, show_progress=False) == build_manifest(
        tiny_model_dir, show_progress=False
    )


def test_other_seed_gives_other_weights(tmp_path, tiny_model_dir):
    other = build_synthetic_phi3(dataclasses.replace(TINY_SPEC, seed=1), tmp_path / "other")
    weights = {entry.path: entry.sha256 for entry in build_manifest(other, show_progress=False)}
    original = {e.path: e.sha256 for e in build_manifest(tiny_model_dir, show_progress=False)}
    assert weights["model.safetensors"] != original["model.safetensors"]
    assert weights["tokenizer.json"] == original["tokenizer.json"]


def test_it_is_a_phi3_with_the_requested_sizes(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert model.config.num_hidden_layers == TINY_SPEC.num_hidden_layers
    assert model.config.hidden_size == TINY_SPEC.hidden_size
    assert model.config.max_position_embeddings == model.config.original_max_position_embeddings


def test_tokenizer_round_trips_any_text_and_knows_the_special_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Ünïcödé, emoji 🙂, tabs\tand 日本語 never map to the unknown token"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_chat_template_is_phi3s(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You are a stand-up comedian."},
            {"role": "user", "content": "Tell me a joke about atom"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == (
        "<|system|>\nYou are a stand-up comedian.<|end|>\n"
        "<|user|>\nTell me a joke about atom<|end|>\n<|assistant|>\n"
    )


def test_generation_stops_at_end_of_turn_or_text(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert set(model.generation_config.eos_token_id) == {
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tokenizer.convert_tokens_to_ids("<|end|>"),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": 65}, "hidden_size \\(65\\) must be divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_attention_heads \\(4\\) must be divisible by"),
        ({"vocab_size": 100}, "vocab_size must be at least 264"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
        ({"weights_dtype": "int8"}, "weights_dtype must be one of float32, bfloat16, float16"),
    ],
)
def test_impossible_sizes_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        build_synthetic_phi3(dataclasses.replace(TINY_SPEC, **change), tmp_path / "bad")


def test_weights_are_stored_in_the_dtype_asked_for_at_half_the_size(tmp_path, tiny_model_dir):
    halved = build_synthetic_phi3(dataclasses.replace(TINY_SPEC, weights_dtype="bfloat16"),
                                  tmp_path / "bf16")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(halved, dtype="auto")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    stored = (halved / "model.safetensors").stat().st_size
    assert stored < 0.55 * (tiny_model_dir / "model.safetensors").stat().st_size

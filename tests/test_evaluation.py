"""The evaluation set format, scoring, agreement, the gate and the recommendation policy."""

from __future__ import annotations

import json

import pytest

from llm_packager.evaluation import (
    EvalSetError,
    GateRule,
    agreement,
    apply_gate,
    format_gate,
    load_eval_set,
    parse_gate,
    recommend,
    resolve_eval_set,
    score_answer,
)
from llm_packager.project import PROJECT_DIR


def _write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shipped_eval_set_is_large_and_well_formed():
    examples = load_eval_set(PROJECT_DIR / "data" / "eval_set.jsonl")
    assert len(examples) >= 40
    assert {e.category for e in examples} >= {
        "capitals", "arithmetic", "unit conversions", "definitions", "instructions",
    }  # fmt: skip
    assert load_eval_set(PROJECT_DIR / "data" / "eval_set.jsonl", limit=5) == examples[:5]


def test_missing_eval_set_is_named(tmp_path):
    with pytest.raises(EvalSetError, match=r"^Evaluation set not found: .*nowhere\.jsonl$"):
        resolve_eval_set(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(EvalSetError, match=r"^Evaluation set not found: "):
        load_eval_set(tmp_path / "nowhere.jsonl")


def test_malformed_line_is_named_with_its_number(tmp_path):
    path = _write(
        tmp_path / "set.jsonl",
        json.dumps({"prompt": "a", "reference": "b"}),
        "",
        '{"prompt": "broken", "reference": ',
    )
    with pytest.raises(EvalSetError, match=r"set\.jsonl, line 3: not valid JSON"):
        load_eval_set(path)


def test_row_without_reference_is_named_with_its_line(tmp_path):
    path = _write(tmp_path / "set.jsonl", json.dumps({"prompt": "a", "reference": "b"}),
                  json.dumps({"id": "x", "prompt": "no answer here"}))  # fmt: skip
    with pytest.raises(EvalSetError, match=r"line 2: 'reference' must be a non-empty string$"):
        load_eval_set(path)


def test_duplicate_ids_and_empty_sets_are_refused(tmp_path):
    row = json.dumps({"id": "same", "prompt": "a", "reference": "b"})
    with pytest.raises(EvalSetError, match=r"line 2: duplicate id 'same'$"):
        load_eval_set(_write(tmp_path / "dup.jsonl", row, row))
    with pytest.raises(EvalSetError, match=r"the evaluation set is empty$"):
        load_eval_set(_write(tmp_path / "empty.jsonl", ""))


def test_user_eval_set_in_the_same_format_works(tmp_path):
    path = _write(
        tmp_path / "mine.jsonl",
        json.dumps({"prompt": "2+2?", "reference": "4", "system": "Be brief."}),
    )
    (example,) = load_eval_set(path)
    assert example.id == "line-1"
    assert example.chat_request(8) == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
        ],
        "max_tokens": 8,
    }


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("Madrid.", "Madrid", {"exact_match": 1.0, "contains_reference": 1.0, "token_f1": 1.0}),
        (
            "The capital is Madrid",
            "Madrid",
            {"exact_match": 0.0, "contains_reference": 1.0, "token_f1": 0.5},
        ),
        ("Madridista", "Madrid", {"exact_match": 0.0, "contains_reference": 0.0, "token_f1": 0.0}),
        ("", "Madrid", {"exact_match": 0.0, "contains_reference": 0.0, "token_f1": 0.0}),
    ],
)
def test_scoring(answer, reference, expected):
    assert score_answer(answer, reference) == pytest.approx(expected)


def test_agreement_between_models():
    assert agreement(["Madrid", "four"], ["madrid.", "five"]) == {
        "identical_rate": 0.5,
        "token_agreement": 0.5,
    }


def test_gate_parses_applies_and_explains():
    rules = parse_gate("exact_match>=0.5, latency_p95_s<=2")
    assert rules == [
        GateRule("exact_match", 0.5, "higher"),
        GateRule("latency_p95_s", 2.0, "lower"),
    ]
    assert format_gate(rules) == "exact_match>=0.5,latency_p95_s<=2"
    assert apply_gate(rules, {"exact_match": 0.7, "latency_p95_s": 1.0}) == ("passed", [])
    assert apply_gate(rules, {"exact_match": 0.1, "latency_p95_s": 3.0}) == (
        "rejected",
        ["exact_match 0.1 < 0.5", "latency_p95_s 3 > 2"],
    )
    with pytest.raises(ValueError, match=r"^gate rule 'speed>=3': unknown metric 'speed'$"):
        parse_gate("speed>=3")
    with pytest.raises(ValueError, match=r"^gate rule 'exact_match=1' is not metric>=number"):
        parse_gate("exact_match=1")


def test_recommendation_picks_among_models_that_passed():
    metrics = {
        "transformers": {"decode_tokens_per_s": 20.0, "token_f1": 0.9, "model_size_bytes": 8.0},
        "onnx": {"decode_tokens_per_s": 150.0, "token_f1": 0.8, "model_size_bytes": 2.0},
    }
    both = {"transformers": "passed", "onnx": "passed"}
    assert recommend("fastest_passed", metrics, both) == "onnx"
    assert recommend("best_quality_passed", metrics, both) == "transformers"
    assert recommend("fastest_passed", metrics, {"transformers": "passed", "onnx": "rejected"}) == (
        "transformers"
    )
    assert (
        recommend("fastest_passed", metrics, {"transformers": "rejected", "onnx": "rejected"})
        is None
    )

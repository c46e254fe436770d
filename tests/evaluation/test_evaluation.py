"""The evaluation set format, scoring, agreement, the gate and the recommendation policy."""

from __future__ import annotations

import json

import pytest

from llm_packager.choices import GateDirection, RecommendationPolicy
from llm_packager.evaluation.metrics import GateError, GateRule, apply_gate, format_gate, parse_gate
from llm_packager.evaluation.scoring import (
    EvalSetError,
    agreement,
    judge,
    load_eval_set,
    rank,
    resolve_eval_set,
    score_answer,
)
from llm_packager.project import PROJECT_DIR

GOLDEN = PROJECT_DIR / "tests" / "data" / "two_candidates_before_redesign.json"


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
    assert rules == (
        GateRule("exact_match", 0.5, GateDirection.higher),
        GateRule("latency_p95_s", 2.0, GateDirection.lower),
    )
    assert format_gate(rules) == "exact_match>=0.5,latency_p95_s<=2"
    assert apply_gate(rules, {"exact_match": 0.7, "latency_p95_s": 1.0}).passed
    rejected = apply_gate(rules, {"exact_match": 0.1, "latency_p95_s": 3.0})
    assert (rejected.status, rejected.reasons) == (
        "rejected", ("exact_match 0.1 < 0.5", "latency_p95_s 3 > 2")
    )  # fmt: skip
    # NaN compares False both ways: a figure that came out NaN must not pass a rule.
    nan = apply_gate(rules, {"exact_match": float("nan"), "latency_p95_s": float("nan")})
    assert nan.reasons == ("exact_match was not measured", "latency_p95_s was not measured")
    with pytest.raises(GateError, match=r"^gate rule 'speed>=3': unknown metric 'speed'$"):
        parse_gate("speed>=3")
    with pytest.raises(GateError, match=r"^gate rule 'exact_match=1' is not metric>=number"):
        parse_gate("exact_match=1")


METRICS = {
    "transformers": {"decode_tokens_per_s": 20.0, "token_f1": 0.9, "model_size_bytes": 8.0},
    "onnx": {"decode_tokens_per_s": 150.0, "token_f1": 0.8, "model_size_bytes": 2.0},
    "onnx-int8": {"decode_tokens_per_s": 90.0, "token_f1": 0.85, "model_size_bytes": 4.0},
}


@pytest.mark.parametrize(
    ("policy", "order"),
    [
        (RecommendationPolicy.fastest_passed, ["onnx", "onnx-int8", "transformers"]),
        (RecommendationPolicy.best_quality_passed, ["transformers", "onnx-int8", "onnx"]),
        (RecommendationPolicy.smallest_passed, ["onnx", "onnx-int8", "transformers"]),
    ],
)
def test_every_policy_ranks_any_number_of_candidates(policy, order):
    assert rank(policy, METRICS) == order
    assert rank(policy, {name: METRICS[name] for name in order[1:]}) == order[1:]
    assert rank(policy, {}) == []


def _golden():
    document = json.loads(GOLDEN.read_text())
    examples = load_eval_set(PROJECT_DIR / "data" / "eval_set.jsonl", document["eval_set_limit"])
    return document, examples


def test_two_candidates_give_exactly_the_figures_of_the_code_before_the_redesign():
    # The file holds what the evaluation code at commit 0c66f0a (two hard-coded models) computed
    # from these worker outputs; the redesigned code must reproduce every figure.
    document, examples = _golden()
    judgement = judge(document["workers"], examples, reference="transformers", rules=(),
                      policy=RecommendationPolicy.fastest_passed)  # fmt: skip
    for name, expected in document["metrics"].items():
        assert {key: judgement.metrics[name][key] for key in expected} == expected
    assert {key: judgement.metrics["onnx"][key] for key in document["agreement"]} == (
        document["agreement"]
    )
    assert judgement.metrics["transformers"]["identical_rate"] == 1.0


def test_two_candidates_give_exactly_the_verdicts_and_picks_of_the_code_before_the_redesign():
    document, examples = _golden()
    for case in document["cases"]:
        judgement = judge(
            document["workers"], examples, reference="transformers",
            rules=parse_gate(case["gate"]), policy=RecommendationPolicy(case["policy"]),
        )  # fmt: skip
        verdicts = {name: {"status": verdict.status, "reasons": list(verdict.reasons)}
                    for name, verdict in judgement.verdicts.items()}  # fmt: skip
        assert verdicts == case["verdicts"], case
        assert judgement.recommended == case["recommended"], case


def test_a_third_candidate_is_judged_against_the_reference_like_the_others():
    document, examples = _golden()
    workers = dict(document["workers"])
    workers["onnx-int8"] = workers["transformers"]  # answers exactly as the reference does
    judgement = judge(workers, examples, reference="transformers",
                      rules=parse_gate("identical_rate>=0.9"),
                      policy=RecommendationPolicy.fastest_passed)  # fmt: skip
    assert judgement.metrics["onnx-int8"]["identical_rate"] == 1.0
    assert judgement.verdicts["onnx"].reasons == ("identical_rate 0.1667 < 0.9",)
    assert [name for name, v in judgement.verdicts.items() if v.passed] == [
        "transformers", "onnx-int8"
    ]  # fmt: skip


def test_held_out_facts_are_not_in_the_evaluation_set():
    evaluated = load_eval_set(PROJECT_DIR / "data" / "eval_set.jsonl")
    held_out = load_eval_set(PROJECT_DIR / "data" / "heldout_facts.jsonl")
    assert len(held_out) == 12
    assert not {e.prompt for e in evaluated} & {fact.prompt for fact in held_out}
    assert not {e.reference.lower() for e in evaluated} & {f.reference.lower() for f in held_out}


def test_the_relative_rule_names_the_metric_both_values_and_the_drop():
    document, examples = _golden()
    fastest = RecommendationPolicy.fastest_passed
    judgement = judge(document["workers"], examples, reference="transformers", rules=(),
                      policy=fastest, max_quality_drop=0.05)  # fmt: skip
    assert judgement.verdicts["transformers"].passed  # the reference is judged absolutely only
    assert judgement.verdicts["onnx"].reasons == (
        "exact_match 0.3333 is 0.1667 below the reference's 0.5 (at most 0.05 allowed)",
        "contains_reference 0.6667 is 0.08333 below the reference's 0.75 (at most 0.05 allowed)",
        "token_f1 0.5556 is 0.06944 below the reference's 0.625 (at most 0.05 allowed)",
    )
    assert judgement.recommended == "transformers"
    lenient = judge(document["workers"], examples, reference="transformers", rules=(),
                    policy=fastest, max_quality_drop=0.17)  # fmt: skip
    assert lenient.verdicts["onnx"].passed and lenient.recommended == "onnx"

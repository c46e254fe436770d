"""The evaluation set, answer scoring, agreement between candidates, figures and ranking.

An evaluation set is JSONL, one object per line: ``id`` (unique), ``prompt`` (the user message),
``reference`` (the expected answer), and optionally ``category`` and ``system`` (a system message).
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llm_packager.choices import RecommendationPolicy
from llm_packager.errors import UserError
from llm_packager.evaluation.metrics import (
    AGREEMENT_METRICS,
    QUALITY_METRICS,
    TEACHER_FORCED_METRICS,
    GateRule,
    Verdict,
    apply_gate,
)
from llm_packager.keys import (
    CONTAINS_REFERENCE_METRIC,
    DECODE_TOKENS_PER_S_METRIC,
    EXACT_MATCH_METRIC,
    IDENTICAL_RATE_METRIC,
    LATENCY_P50_S_METRIC,
    LATENCY_P95_S_METRIC,
    LOAD_SECONDS_METRIC,
    MODEL_SIZE_BYTES_METRIC,
    MODEL_SIZE_MIB_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
    PEAK_RSS_LOAD_MIB_METRIC,
    TOKEN_AGREEMENT_METRIC,
    TOKEN_F1_METRIC,
    TTFT_S_METRIC,
)
from llm_packager.models.parity import prefix_agreement

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class EvalSetError(UserError, ValueError):
    """The evaluation set is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class EvalExample:
    """One prompt of the evaluation set."""

    id: str
    prompt: str
    reference: str
    category: str = ""
    system: str = ""

    def chat_request(self, max_tokens: int) -> dict:
        """The OpenAI chat request for this example (greedy: no temperature, no top_p)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.prompt})
        return {"messages": messages, "max_tokens": max_tokens}


def resolve_eval_set(dataset: str) -> Path:
    """A local path to the evaluation set: a path inside the project, an absolute path, or an
    MLflow artifact URI (``runs:/...``, ``s3://...``) downloaded first.

    Raises:
        EvalSetError: the file does not exist or cannot be downloaded.
    """
    from llm_packager.project import PROJECT_DIR

    if "://" in dataset or dataset.startswith("runs:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=dataset))
        except (MlflowException, OSError) as error:
            raise EvalSetError(f"Evaluation set not found: {dataset} ({error})") from error
    path = Path(dataset).expanduser()
    path = path if path.is_absolute() else PROJECT_DIR / path
    if not path.is_file():
        raise EvalSetError(f"Evaluation set not found: {path}")
    return path


def file_sha256(path: Path) -> str:
    """Content hash that versions an evaluation set."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_eval_set(path: Path, limit: int = 0) -> list[EvalExample]:
    """Read and check an evaluation set; ``limit`` > 0 keeps the first ``limit`` examples.

    Raises:
        EvalSetError: missing file, invalid JSON, a row without ``prompt`` or ``reference``, a
            non-string field, a duplicate id, or an empty set; naming the line.
    """
    if not path.is_file():
        raise EvalSetError(f"Evaluation set not found: {path}")
    examples: list[EvalExample] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalSetError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise EvalSetError(f"{path}, line {number}: expected a JSON object")
        for field in ("prompt", "reference"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise EvalSetError(f"{path}, line {number}: '{field}' must be a non-empty string")
        for field in ("id", "category", "system"):
            if field in row and not isinstance(row[field], str):
                raise EvalSetError(f"{path}, line {number}: '{field}' must be a string")
        example_id = row.get("id") or f"line-{number}"
        if example_id in seen:
            raise EvalSetError(f"{path}, line {number}: duplicate id '{example_id}'")
        seen.add(example_id)
        examples.append(
            EvalExample(
                id=example_id,
                prompt=row["prompt"],
                reference=row["reference"],
                category=row.get("category", ""),
                system=row.get("system", ""),
            )
        )
    if not examples:
        raise EvalSetError(f"{path}: the evaluation set is empty")
    return examples[:limit] if limit > 0 else examples


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of word precision and recall after normalisation."""
    answer_words, reference_words = (
        normalise_answer(answer).split(),
        normalise_answer(reference).split(),
    )
    common = sum((Counter(answer_words) & Counter(reference_words)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(answer_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def score_answer(answer: str, reference: str) -> dict[str, float]:
    """Exact match, contains-reference and token F1 of one answer, each in [0, 1]."""
    normalised_answer, normalised_reference = normalise_answer(answer), normalise_answer(reference)
    contains = bool(normalised_reference) and (
        f" {normalised_reference} " in f" {normalised_answer} "
    )
    return {
        EXACT_MATCH_METRIC: float(normalised_answer == normalised_reference),
        CONTAINS_REFERENCE_METRIC: float(contains),
        TOKEN_F1_METRIC: token_f1(answer, reference),
    }


def agreement(answers_a: list[str], answers_b: list[str]) -> dict[str, float]:
    """How often two models give the same answer: identical after normalisation, and the share of
    words they share before their first difference (both greedy, so differences are the models')."""
    identical = [
        normalise_answer(a) == normalise_answer(b)
        for a, b in zip(answers_a, answers_b, strict=True)
    ]
    words_a = [normalise_answer(a).split() for a in answers_a]
    words_b = [normalise_answer(b).split() for b in answers_b]
    return {
        IDENTICAL_RATE_METRIC: sum(identical) / len(identical),
        TOKEN_AGREEMENT_METRIC: prefix_agreement(words_a, words_b),
    }


def candidate_metrics(result: dict, scores: list[dict[str, float]]) -> dict[str, float]:
    """A candidate's figures from its worker's output (``llm_packager.evaluation.worker``) and the
    scores of its answers: mean quality, decode speed, latency percentiles, memory and size, and
    the teacher-forced figures where the worker measured them."""
    answers = result["answers"]
    latencies = [answer["latency_s"] for answer in answers]
    ttft = result[TTFT_S_METRIC] or 0.0
    decode_time = sum(latencies) - ttft * len(answers)
    decode_tokens = sum(max(answer["completion_tokens"] - 1, 0) for answer in answers)
    if decode_time > 0 and decode_tokens > 0:
        decode_rate = decode_tokens / decode_time
    else:
        # Answers too short to separate decoding from the first token: report throughput.
        decode_rate = sum(answer["completion_tokens"] for answer in answers) / sum(latencies)
    metrics = {name: statistics.fmean(score[name] for score in scores) for name in QUALITY_METRICS}
    metrics |= {
        DECODE_TOKENS_PER_S_METRIC: decode_rate,
        TTFT_S_METRIC: ttft,
        LATENCY_P50_S_METRIC: statistics.median(latencies),
        LATENCY_P95_S_METRIC: statistics.quantiles(latencies, n=20, method="inclusive")[-1]
        if len(latencies) > 1 else latencies[0],
        LOAD_SECONDS_METRIC: result[LOAD_SECONDS_METRIC],
        PEAK_RSS_LOAD_MIB_METRIC: result[PEAK_RSS_LOAD_MIB_METRIC],
        PEAK_RSS_GENERATE_MIB_METRIC: result[PEAK_RSS_GENERATE_MIB_METRIC],
        MODEL_SIZE_BYTES_METRIC: float(result[MODEL_SIZE_BYTES_METRIC]),
        MODEL_SIZE_MIB_METRIC: result[MODEL_SIZE_BYTES_METRIC] / 2**20,
    }  # fmt: skip
    # Teacher-forced figures, where the worker compared the candidate with the reference.
    metrics |= {name: result[name] for name in TEACHER_FORCED_METRICS if name in result}
    return metrics


# What each policy ranks by, largest first.
_POLICY_KEYS = {
    RecommendationPolicy.fastest_passed: lambda metrics: metrics[DECODE_TOKENS_PER_S_METRIC],
    RecommendationPolicy.best_quality_passed: lambda metrics: metrics[TOKEN_F1_METRIC],
    RecommendationPolicy.smallest_passed: lambda metrics: -metrics[MODEL_SIZE_BYTES_METRIC],
}


def rank(policy: RecommendationPolicy, metrics: dict[str, dict[str, float]]) -> list[str]:
    """Candidate names best first by the policy's measure; ties keep the candidates' order."""
    key = _POLICY_KEYS[policy]
    return sorted(metrics, key=lambda name: key(metrics[name]), reverse=True)


@dataclass(frozen=True)
class Judgement:
    """Every candidate's per-answer scores, figures and verdict, and the candidate the policy
    recommends (None: no candidate passed)."""

    scores: dict[str, list[dict[str, float]]]
    metrics: dict[str, dict[str, float]]
    verdicts: dict[str, Verdict]
    recommended: str | None


def judge(
    results: dict[str, dict],
    examples: list[EvalExample],
    *,
    reference: str,
    rules: tuple[GateRule, ...],
    policy: RecommendationPolicy,
    max_quality_drop: float = 1.0,
) -> Judgement:
    """Score each candidate's answers, measure its agreement with the reference candidate (if it
    was evaluated; the reference agrees with itself), apply the gate, and pick by the policy.

    Args:
        results: each candidate's worker output (``llm_packager.evaluation.worker``), by name.
        examples: the evaluation set the answers belong to, in the same order.
        reference: the candidate the others are compared with.
        rules: the gate's absolute rules.
        policy: how to pick among the candidates that passed.
        max_quality_drop: the relative rule: how far a candidate's quality may fall below the
            reference's (1: no limit). The reference itself is judged by the absolute rules.
    """
    scores = {
        name: [score_answer(answer["answer"], example.reference)
               for answer, example in zip(result["answers"], examples, strict=True)]
        for name, result in results.items()
    }  # fmt: skip
    metrics = {name: candidate_metrics(result, scores[name]) for name, result in results.items()}
    if reference in results:
        reference_answers = [answer["answer"] for answer in results[reference]["answers"]]
        for name, result in results.items():
            answers = [answer["answer"] for answer in result["answers"]]
            metrics[name] |= (
                dict.fromkeys(AGREEMENT_METRICS, 1.0)
                if name == reference
                else agreement(reference_answers, answers)
            )
    verdicts = {
        name: apply_gate(
            rules, figures, max_quality_drop=max_quality_drop,
            reference=metrics[reference] if reference in metrics and name != reference else None,
        )
        for name, figures in metrics.items()
    }  # fmt: skip
    ranking = rank(policy, {name: metrics[name] for name in metrics if verdicts[name].passed})
    return Judgement(scores, metrics, verdicts, ranking[0] if ranking else None)

"""The evaluation set, answer scoring, agreement between models, the gate and the recommendation.

An evaluation set is JSONL, one object per line: ``id`` (unique), ``prompt`` (the user message),
``reference`` (the expected answer), and optionally ``category`` and ``system`` (a system message).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llm_packager.parity import prefix_agreement

QUALITY_METRICS = ("exact_match", "contains_reference", "token_f1")
# Every per-model metric the evaluate step measures, and so every metric a gate may name.
MODEL_METRICS = (
    *QUALITY_METRICS,
    "decode_tokens_per_s",
    "ttft_s",
    "latency_p50_s",
    "latency_p95_s",
    "load_seconds",
    "peak_rss_load_mib",
    "peak_rss_generate_mib",
    "model_size_mib",
)
GATE_DIRECTIONS = {">=": "higher", "<=": "lower"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class EvalSetError(ValueError):
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
        "exact_match": float(normalised_answer == normalised_reference),
        "contains_reference": float(contains),
        "token_f1": token_f1(answer, reference),
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
        "identical_rate": sum(identical) / len(identical),
        "token_agreement": prefix_agreement(words_a, words_b),
    }


@dataclass(frozen=True)
class GateRule:
    """One threshold of the gate: ``metric`` must be ``direction`` (higher/lower) ``threshold``."""

    metric: str
    threshold: float
    direction: str

    def check(self, metrics: dict[str, float]) -> str | None:
        """None if the rule holds, else the reason it does not."""
        if self.metric not in metrics:
            return f"{self.metric} was not measured"
        value = metrics[self.metric]
        if self.direction == "higher" and value < self.threshold:
            return f"{self.metric} {value:.4g} < {self.threshold:g}"
        if self.direction == "lower" and value > self.threshold:
            return f"{self.metric} {value:.4g} > {self.threshold:g}"
        return None


def parse_gate(spec: str) -> list[GateRule]:
    """Parse ``metric>=value,metric<=value`` (empty: no rule).

    Raises:
        ValueError: naming a rule that is not ``metric>=number`` or ``metric<=number``, or an
            unknown metric.
    """
    rules = []
    for text in (part.strip() for part in spec.split(",")):
        if not text:
            continue
        operator = next((op for op in GATE_DIRECTIONS if op in text), None)
        metric, _, value = text.partition(operator) if operator else (text, "", "")
        try:
            threshold = float(value)
        except ValueError:
            raise ValueError(
                f"gate rule '{text}' is not metric>=number or metric<=number"
            ) from None
        if metric.strip() not in MODEL_METRICS:
            raise ValueError(f"gate rule '{text}': unknown metric '{metric.strip()}'")
        rules.append(GateRule(metric.strip(), threshold, GATE_DIRECTIONS[operator]))
    return rules


def format_gate(rules: list[GateRule]) -> str:
    """The inverse of `parse_gate`, sorted by metric so equal gates give equal strings."""
    symbols = {direction: op for op, direction in GATE_DIRECTIONS.items()}
    return ",".join(
        f"{rule.metric}{symbols[rule.direction]}{rule.threshold:g}"
        for rule in sorted(rules, key=lambda rule: rule.metric)
    )


def apply_gate(rules: list[GateRule], metrics: dict[str, float]) -> tuple[str, list[str]]:
    """Return ``("passed", [])`` or ``("rejected", reasons)``."""
    reasons = [reason for rule in rules if (reason := rule.check(metrics)) is not None]
    return ("rejected" if reasons else "passed"), reasons


RECOMMENDATION_POLICIES = ("fastest_passed", "best_quality_passed", "smallest_passed")


def recommend(
    policy: str, metrics: dict[str, dict[str, float]], verdicts: dict[str, str]
) -> str | None:
    """The model the policy picks among those that passed, or None if none passed."""
    passed = [name for name, verdict in verdicts.items() if verdict == "passed"]
    if not passed:
        return None
    keys = {
        "fastest_passed": lambda name: metrics[name]["decode_tokens_per_s"],
        "best_quality_passed": lambda name: metrics[name]["token_f1"],
        "smallest_passed": lambda name: -metrics[name]["model_size_bytes"],
    }
    if policy not in keys:
        raise ValueError(
            f"recommendation policy '{policy}' is not one of {RECOMMENDATION_POLICIES}"
        )
    return max(passed, key=keys[policy])

"""``evaluation.json``: what the evaluate step decided, in one typed contract that register reads.

The evaluate step writes one `Evaluation` per run: every candidate with its runtime, model URI,
run, measured metrics and verdict (passed or rejected, with reasons), the reference candidate that
agreement was measured against, and the recommendation (the policy, the candidate it picked or
none, and why). `Evaluation.load` reads it back through the same dataclasses and refuses a file
that does not match them, so the two steps cannot drift apart.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_packager.choices import RecommendationPolicy
from llm_packager.errors import UserError
from llm_packager.evaluation.metrics import PASSED, REJECTED, Verdict
from llm_packager.evaluation.scoring import rank
from llm_packager.keys import EVALUATION_FILE

SCHEMA_VERSION = 1


class EvaluationRecordError(UserError, ValueError):
    """An evaluation.json that is missing or does not match the contract; names the field."""


@dataclass(frozen=True)
class CandidateResult:
    """One evaluated candidate model."""

    name: str
    # The name of a declared runtime (llm_packager.config.specs.RUNTIMES); this layer cannot
    # read the declarations, so register checks it against them.
    runtime: str
    model_uri: str
    run_id: str
    metrics: dict[str, float]
    verdict: Verdict


@dataclass(frozen=True)
class Recommendation:
    """The candidate to ship, by the policy, among those that passed (None: none passed)."""

    policy: RecommendationPolicy
    candidate: str | None
    reason: str


@dataclass(frozen=True)
class Evaluation:
    """Everything the evaluate step decided, as register reads it."""

    candidates: tuple[CandidateResult, ...]
    reference: str | None
    recommendation: Recommendation
    random_weights: bool
    dataset: str
    dataset_sha256: str
    notes: tuple[str, ...] = ()
    schema_version: int = field(default=SCHEMA_VERSION)

    def candidate(self, name: str) -> CandidateResult:
        """The candidate called ``name``.

        Raises:
            KeyError: no candidate has that name.
        """
        for candidate in self.candidates:
            if candidate.name == name:
                return candidate
        raise KeyError(f"no candidate named '{name}'; candidates: {self.names()}")

    def names(self) -> list[str]:
        """Candidate names in evaluation order."""
        return [candidate.name for candidate in self.candidates]

    def ranked(self, *, passed_only: bool = True) -> list[CandidateResult]:
        """Candidates best first by the recommendation policy (those that passed, by default)."""
        chosen = [c for c in self.candidates if c.verdict.passed or not passed_only]
        order = rank(self.recommendation.policy, {c.name: c.metrics for c in chosen})
        return [self.candidate(name) for name in order]

    def to_json(self) -> str:
        """The contract as JSON (enums as their values)."""
        document = asdict(self)
        document["recommendation"]["policy"] = self.recommendation.policy.value
        return json.dumps(document, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Evaluation:
        """Parse and check a contract written by `to_json`.

        Raises:
            EvaluationRecordError: not JSON, another schema version, or a field missing or of
                the wrong type, naming it.
        """
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise EvaluationRecordError(f"{EVALUATION_FILE} is not JSON: {error}") from error
        version = _field(document, "schema_version", int, "")
        if version != SCHEMA_VERSION:
            raise EvaluationRecordError(
                f"{EVALUATION_FILE} has schema version {version}; this code reads "
                f"{SCHEMA_VERSION} (rerun evaluate with this code version)"
            )
        recommendation = _field(document, "recommendation", dict, "")
        return cls(
            candidates=tuple(
                _candidate(row, f"candidates[{index}].")
                for index, row in enumerate(_field(document, "candidates", list, ""))
            ),
            reference=_field(document, "reference", (str, type(None)), ""),
            recommendation=Recommendation(
                policy=_enum(
                    RecommendationPolicy,
                    _field(recommendation, "policy", str, "recommendation."),
                    "recommendation.policy",
                ),
                candidate=_field(recommendation, "candidate", (str, type(None)), "recommendation."),
                reason=_field(recommendation, "reason", str, "recommendation."),
            ),
            random_weights=_field(document, "random_weights", bool, ""),
            dataset=_field(document, "dataset", str, ""),
            dataset_sha256=_field(document, "dataset_sha256", str, ""),
            notes=tuple(_field(document, "notes", list, "")),
            schema_version=version,
        )

    @classmethod
    def load(cls, run_id: str) -> Evaluation:
        """The contract an evaluate run logged.

        Raises:
            EvaluationRecordError: the run has no readable evaluation.json.
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(prefix="evaluation-") as scratch:
            try:
                path = mlflow.artifacts.download_artifacts(
                    f"runs:/{run_id}/{EVALUATION_FILE}", dst_path=scratch
                )
            except (MlflowException, OSError) as error:
                raise EvaluationRecordError(
                    f"evaluate run {run_id} has no {EVALUATION_FILE} ({error}); rerun evaluate"
                ) from error
            return cls.from_json(Path(path).read_text())


def _field(document: Any, name: str, kind: type | tuple[type, ...], prefix: str) -> Any:
    if not isinstance(document, dict) or name not in document:
        raise EvaluationRecordError(f"{EVALUATION_FILE}: '{prefix}{name}' is missing")
    value = document[name]
    # bool is an int in Python; a count must not be a flag.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EvaluationRecordError(
            f"{EVALUATION_FILE}: '{prefix}{name}' has the wrong type ({type(value).__name__})"
        )
    return value


def _enum(enumeration: type, value: str, name: str) -> Any:
    try:
        return enumeration(value)
    except ValueError:
        raise EvaluationRecordError(
            f"{EVALUATION_FILE}: '{name}' has unknown value '{value}'"
        ) from None


def _candidate(row: Any, prefix: str) -> CandidateResult:
    metrics = _field(row, "metrics", dict, prefix)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()):
        raise EvaluationRecordError(f"{EVALUATION_FILE}: '{prefix}metrics' must hold numbers")
    verdict = _field(row, "verdict", dict, prefix)
    status = _field(verdict, "status", str, prefix + "verdict.")
    if status not in (PASSED, REJECTED):
        raise EvaluationRecordError(
            f"{EVALUATION_FILE}: '{prefix}verdict.status' has unknown value '{status}'"
        )
    return CandidateResult(
        name=_field(row, "name", str, prefix),
        runtime=_field(row, "runtime", str, prefix),
        model_uri=_field(row, "model_uri", str, prefix),
        run_id=_field(row, "run_id", str, prefix),
        metrics={str(key): float(value) for key, value in metrics.items()},
        verdict=Verdict(status, tuple(_field(verdict, "reasons", list, prefix + "verdict."))),
    )

"""The metrics evaluate measures for every candidate, and the gate rules that judge them.

A gate is a list of rules, ``metric`` ``>=`` or ``<=`` a threshold. It is written in conf/ as
``{metric: {threshold: x, direction: higher|lower}}`` and passed to the evaluate step as the text
``metric>=x,metric<=y`` (sorted, so equal gates give equal parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import MISSING

from llm_packager.choices import GateDirection
from llm_packager.errors import UserError
from llm_packager.keys import (
    CONTAINS_REFERENCE_METRIC,
    DECODE_TOKENS_PER_S_METRIC,
    EXACT_MATCH_METRIC,
    IDENTICAL_RATE_METRIC,
    KLD_MEAN_METRIC,
    KLD_P95_METRIC,
    KLD_P99_METRIC,
    LATENCY_P50_S_METRIC,
    LATENCY_P95_S_METRIC,
    LOAD_SECONDS_METRIC,
    MODEL_SIZE_BYTES_METRIC,
    MODEL_SIZE_MIB_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
    PEAK_RSS_LOAD_MIB_METRIC,
    PERPLEXITY_METRIC,
    PERPLEXITY_RATIO_METRIC,
    TOKEN_AGREEMENT_METRIC,
    TOKEN_F1_METRIC,
    TOP1_AGREEMENT_METRIC,
    TTFT_S_METRIC,
)

QUALITY_METRICS = (EXACT_MATCH_METRIC, CONTAINS_REFERENCE_METRIC, TOKEN_F1_METRIC)
# Measured against the reference candidate; the reference agrees with itself (1.0).
AGREEMENT_METRICS = (IDENTICAL_RATE_METRIC, TOKEN_AGREEMENT_METRIC)
# Teacher-forced against the reference candidate over a fixed corpus
# (llm_packager.evaluation.teacher_forcing). Each is already measured against the reference (its
# own KL is 0, its top-1 agreement and perplexity ratio 1), so an absolute rule on them
# (kld_mean<=0.05, top1_agreement>=0.9, perplexity_ratio<=1.05) is the relative rule.
TEACHER_FORCED_METRICS = (KLD_MEAN_METRIC, KLD_P95_METRIC, KLD_P99_METRIC, TOP1_AGREEMENT_METRIC,
                          PERPLEXITY_METRIC, PERPLEXITY_RATIO_METRIC)  # fmt: skip
# Every per-candidate metric the evaluate step measures, and so every metric a gate may name.
MODEL_METRICS = (
    *QUALITY_METRICS,
    *AGREEMENT_METRICS,
    *TEACHER_FORCED_METRICS,
    DECODE_TOKENS_PER_S_METRIC,
    TTFT_S_METRIC,
    LATENCY_P50_S_METRIC,
    LATENCY_P95_S_METRIC,
    LOAD_SECONDS_METRIC,
    PEAK_RSS_LOAD_MIB_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
    MODEL_SIZE_BYTES_METRIC,
    MODEL_SIZE_MIB_METRIC,
)
_OPERATORS = {">=": GateDirection.higher, "<=": GateDirection.lower}


@dataclass
class GateThreshold:
    """One gate rule as written in conf/ (the config schema's shape)."""

    threshold: float = MISSING
    direction: GateDirection = MISSING


@dataclass(frozen=True)
class GateRule:
    """``metric`` must be ``direction`` (higher: at least; lower: at most) ``threshold``."""

    metric: str
    threshold: float
    direction: GateDirection

    def check(self, metrics: dict[str, float]) -> str | None:
        """None if the rule holds, else the reason it does not."""
        value = metrics.get(self.metric)
        # NaN compares False both ways, so it would pass every rule: a figure that came out NaN
        # (a build whose logits overflowed, an engine that does not measure it) is not measured.
        if value is None or not math.isfinite(value):
            return f"{self.metric} was not measured"
        if self.direction == GateDirection.higher and value < self.threshold:
            return f"{self.metric} {value:.4g} < {self.threshold:g}"
        if self.direction == GateDirection.lower and value > self.threshold:
            return f"{self.metric} {value:.4g} > {self.threshold:g}"
        return None


class GateError(UserError, ValueError):
    """A gate rule that cannot be parsed or names an unknown metric."""


def parse_gate(text: str) -> tuple[GateRule, ...]:
    """Parse ``metric>=value,metric<=value`` (empty: no rule).

    Raises:
        GateError: naming a rule that is not ``metric>=number`` or ``metric<=number``, or an
            unknown metric.
    """
    rules = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        operator = next((op for op in _OPERATORS if op in part), None)
        metric, _, value = part.partition(operator) if operator else (part, "", "")
        try:
            threshold = float(value)
        except ValueError:
            raise GateError(f"gate rule '{part}' is not metric>=number or metric<=number") from None
        if metric.strip() not in MODEL_METRICS:
            raise GateError(f"gate rule '{part}': unknown metric '{metric.strip()}'")
        rules.append(GateRule(metric.strip(), threshold, _OPERATORS[operator]))
    return tuple(rules)


def format_gate(rules: tuple[GateRule, ...]) -> str:
    """The inverse of `parse_gate`, sorted by metric so equal gates give equal strings."""
    symbols = {direction: operator for operator, direction in _OPERATORS.items()}
    return ",".join(
        f"{rule.metric}{symbols[rule.direction]}{rule.threshold:g}"
        for rule in sorted(rules, key=lambda rule: rule.metric)
    )


def gate_from_config(gate: dict) -> tuple[GateRule, ...]:
    """Rules from the conf/ shape ``{metric: {threshold, direction}}``.

    Raises:
        GateError: an unknown metric.
    """
    rules = []
    for metric, rule in gate.items():
        if metric not in MODEL_METRICS:
            raise GateError(f"unknown metric '{metric}'; known: {', '.join(MODEL_METRICS)}")
        rules.append(GateRule(str(metric), float(rule.threshold), GateDirection(rule.direction)))
    return tuple(sorted(rules, key=lambda rule: rule.metric))


def gate_to_config(rules: tuple[GateRule, ...]) -> dict[str, GateThreshold]:
    """The conf/ shape of a gate, the inverse of `gate_from_config`."""
    return {rule.metric: GateThreshold(rule.threshold, rule.direction) for rule in rules}


PASSED = "passed"
REJECTED = "rejected"


@dataclass(frozen=True)
class Verdict:
    """The gate's verdict on one candidate: passed, or rejected with the reasons."""

    status: str
    reasons: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Whether the candidate met every rule of the gate."""
        return self.status == PASSED

    def explanation(self) -> str:
        """The reasons in one line, or that every threshold was met."""
        return "; ".join(self.reasons) or "all thresholds met"


def quality_drops(
    metrics: dict[str, float], reference: dict[str, float], max_drop: float
) -> list[str]:
    """The relative rule: one reason per quality metric on which a candidate falls more than
    ``max_drop`` below the reference candidate on the same prompts."""
    reasons = []
    for metric in QUALITY_METRICS:
        drop = reference[metric] - metrics[metric]
        # A tolerance, so that equal scores computed in another order never count as a drop.
        if drop > max_drop + 1e-9:
            reasons.append(
                f"{metric} {metrics[metric]:.4g} is {drop:.4g} below the reference's "
                f"{reference[metric]:.4g} (at most {max_drop:g} allowed)"
            )
    return reasons


def apply_gate(
    rules: tuple[GateRule, ...],
    metrics: dict[str, float],
    *,
    reference: dict[str, float] | None = None,
    max_quality_drop: float = 1.0,
) -> Verdict:
    """Passed, or rejected with one reason per absolute rule that does not hold and, given the
    reference candidate's metrics, per quality metric that fell more than ``max_quality_drop``
    below the reference's (quality lies in [0, 1], so 1 sets no limit)."""
    reasons = [reason for rule in rules if (reason := rule.check(metrics)) is not None]
    if reference is not None:
        reasons += quality_drops(metrics, reference, max_quality_drop)
    return Verdict(REJECTED if reasons else PASSED, tuple(reasons))

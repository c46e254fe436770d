"""Entry point ``evaluate``: every candidate side by side on quality, agreement, speed and memory.

Reads: `EvaluateParameters` (``llm_packager/config/specs.py``, or ``--help``): the upstream log runs
(any number; each names its candidate in the tag ``llm_packager.candidate``), the reference
candidate agreement is measured against, the evaluation set and its expected sha256, generation
settings (greedy), the gate (absolute thresholds, and the largest quality drop allowed below the
reference) and the recommendation policy.

Writes (on its own run):
    ``evaluation.json``, the typed contract register reads (``llm_packager.evaluation.record``):
    every candidate's metrics and verdict, and the recommendation; metrics
    ``<candidate>.<metric>``; the per-prompt table ``eval_table.json`` (``mlflow.log_table``);
    ``comparison.csv`` and ``comparison.json``; ``charts/quality.png``, ``charts/latency.png``,
    ``charts/speed.png``, ``charts/memory.png``, ``charts/kl_divergence.png`` (each candidate's
    teacher-forced KL divergence from the reference, per position); ``report.html``
    (self-contained); the evaluation
    set as a dataset input; tags ``<candidate>.validation_status`` (passed/rejected),
    ``<candidate>.validation_reasons``, ``recommended_candidate`` and ``recommended_model_uri``
    for searching in the UI; the verdict as tags on each LoggedModel. A rejected candidate is a
    result, not a failure: the step still exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import mlflow
import pandas as pd

from llm_packager.choices import EvaluationEngine
from llm_packager.config.specs import EvaluateParameters, runtime_named
from llm_packager.errors import InvalidParametersError, UserError, retry_after_insert_race
from llm_packager.evaluation.metrics import TEACHER_FORCED_METRICS, format_gate
from llm_packager.evaluation.record import (
    CandidateResult,
    Evaluation,
    Recommendation,
)
from llm_packager.evaluation.report import RANDOM_WEIGHTS_WARNING, write_report
from llm_packager.evaluation.scoring import (
    EvalExample,
    EvalSetError,
    file_sha256,
    judge,
    load_eval_set,
    resolve_eval_set,
)
from llm_packager.evaluation.spark_engine import (
    LOCAL_ONLY_METRICS,
    SPARK_NOTE,
    answer_on_spark,
    local_only_unmeasured,
    spark_session,
)
from llm_packager.evaluation.teacher_forcing import KL_DIVERGENCES, TEACHER_FORCED_SKIPPED
from llm_packager.keys import (
    CANDIDATE_TAG,
    DATASET_SHA256_TAG,
    EVAL_TABLE_ARTIFACT,
    EVALUATION_FILE,
    EVALUATION_OUTPUT,
    EVALUATION_RUN_ID_TAG,
    EXACT_MATCH_METRIC,
    MODEL_URI_TAG,
    RANDOM_WEIGHTS_TAG,
    RECOMMENDATION_POLICY_TAG,
    RECOMMENDED_CANDIDATE_TAG,
    RECOMMENDED_MODEL_URI_TAG,
    REPORT_ARTIFACT,
    REPORT_OUTPUT,
    RUNTIME_TAG,
    SYNTHETIC_RANDOM_WEIGHTS_TAG,
    TOKEN_F1_METRIC,
    VALIDATION_REASONS_TAG,
    VALIDATION_STATUS_TAG,
    candidate_key,
    run_verdict_key,
)
from llm_packager.pipeline.reuse import announce_outputs
from llm_packager.pipeline.step_run import run_command_line

logger = logging.getLogger(__name__)


class ModelUnusableError(UserError, ValueError):
    """An upstream model could not be loaded or did not answer."""


def _candidates(request: EvaluateParameters) -> list[tuple[str, str, str, str]]:
    """``(name, runtime, model_uri, run_id)`` of every upstream log run, in the order given."""
    client = mlflow.MlflowClient()
    candidates = []
    for run_id in request.candidate_run_ids:
        tags = client.get_run(run_id).data.tags
        uri = tags.get(MODEL_URI_TAG)
        if not uri:
            raise ModelUnusableError(f"log run {run_id} announces no model (no model URI)")
        if CANDIDATE_TAG not in tags or RUNTIME_TAG not in tags:
            raise ModelUnusableError(
                f"log run {run_id} does not name its candidate (tags {CANDIDATE_TAG}, "
                f"{RUNTIME_TAG}); it was logged by an older version: rerun its log step"
            )
        runtime = runtime_named(tags[RUNTIME_TAG]).name
        candidates.append((tags[CANDIDATE_TAG], runtime, uri, run_id))
    names = [name for name, *_ in candidates]
    if duplicated := sorted({name for name in names if names.count(name) > 1}):
        raise InvalidParametersError(f"two candidate runs are both named '{duplicated[0]}'")
    if not candidates:
        raise InvalidParametersError("evaluate needs at least one candidate run")
    return candidates


def _random_weights(run_ids: list[str]) -> bool:
    client = mlflow.MlflowClient()
    return any(
        client.get_run(run_id).data.tags.get(SYNTHETIC_RANDOM_WEIGHTS_TAG) == "true"
        for run_id in run_ids
    )


def _answer(name: str, uri: str, run_id: str, eval_set: Path, request: EvaluateParameters,
            teacher_forced: Path | None) -> dict:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"eval-{name}-") as scratch:
        output = Path(scratch) / "answers.json"
        command = [
            sys.executable, "-m", "llm_packager.evaluation.worker", "--model-uri", uri,
            "--eval-set", str(eval_set), "--limit", str(request.limit),
            "--max-tokens", str(request.max_tokens), "--batch-size", str(request.batch_size),
            "--ttft-requests", str(request.ttft_requests), "--label", name,
            "--output", str(output),
        ]  # fmt: skip
        if teacher_forced is not None:
            command += ["--teacher-forced-dir", str(teacher_forced)]
            if name == request.reference:
                command.append("--teacher-forced-reference")
        # Progress goes to the console; the output is kept to explain a failure.
        try:
            completed = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},
                timeout=request.worker_timeout_s,
            )  # fmt: skip
        except subprocess.TimeoutExpired as error:
            # subprocess.run has killed the worker; its output so far tells how far it got.
            tail = (error.output or b"").decode(errors="replace") if isinstance(
                error.output, bytes) else (error.output or "")  # fmt: skip
            raise ModelUnusableError(
                f"The {name} model {uri} (run {run_id}) did not answer the evaluation set within "
                f"{request.worker_timeout_s} s (evaluate.worker_timeout_s); it was stopped. Last "
                f"output: {' | '.join(tail.splitlines()[-3:])[-500:]}"
            ) from error
        if completed.returncode != 0 or not output.exists():
            tail = " | ".join(line for line in completed.stdout.splitlines()[-8:] if line.strip())
            raise ModelUnusableError(
                f"The {name} model {uri} (run {run_id}) could not be loaded or did not answer: "
                f"{tail[-1500:]}"
            )
        return json.loads(output.read_text())


def _answer_on_spark(candidates: list[tuple[str, str, str, str]], examples: list[EvalExample],
                     request: EvaluateParameters) -> dict[str, dict]:  # fmt: skip
    # A gate on a figure Spark does not measure would judge a NaN: refused before any work.
    not_measured = set(LOCAL_ONLY_METRICS) | set(TEACHER_FORCED_METRICS)
    if local_only := sorted({rule.metric for rule in request.gate} & not_measured):
        raise InvalidParametersError(
            f"evaluate.engine=spark does not measure {', '.join(local_only)} (local-only "
            "figures); take them out of evaluate.gate or use evaluate.engine=local"
        )
    spark = spark_session(request.spark_master)
    return {name: answer_on_spark(spark, uri, examples, max_tokens=request.max_tokens,
                                  partitions=request.spark_partitions,
                                  batch_size=request.batch_size)
            for name, _, uri, _ in candidates}  # fmt: skip


def _log_dataset(examples: list[EvalExample], dataset: str, eval_set: Path) -> pd.DataFrame:
    frame = pd.DataFrame([vars(example) for example in examples])
    with warnings.catch_warnings():
        # MLflow registers its local-file dataset source for two URI schemes ('' and 'file') and
        # then warns that a local path matches both; either gives the same source.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        source = mlflow.data.from_pandas(frame, source=dataset, name=eval_set.name)
    # The server gets or creates the dataset in two statements, so two evaluations that log the
    # same set at once can both try to create it; the loser finds it on a second try.
    retry_after_insert_race("The evaluation set", mlflow.log_input, source, "evaluation")
    return frame


def evaluate(request: EvaluateParameters, run_id: str) -> Evaluation:
    """Answer the evaluation set with each candidate, score and compare them, apply the gate."""
    eval_set = resolve_eval_set(request.dataset)
    digest = file_sha256(eval_set)
    if request.dataset_sha256 and digest != request.dataset_sha256:
        raise EvalSetError(
            f"Evaluation set {request.dataset} changed: sha256 {digest}, expected "
            f"{request.dataset_sha256}; rerun main so the new content is recorded"
        )
    examples = load_eval_set(eval_set, request.limit)
    candidates = _candidates(request)
    random_weights = _random_weights([run for *_, run in candidates])
    frame = _log_dataset(examples, request.dataset, eval_set)
    mlflow.set_tags({DATASET_SHA256_TAG: digest, RANDOM_WEIGHTS_TAG: str(random_weights).lower()})

    # The reference runs first: it leaves the teacher-forced corpus and its log-probabilities
    # in the folder for the others (llm_packager.evaluation.teacher_forcing).
    by_reference_first = sorted(candidates, key=lambda candidate: candidate[0] != request.reference)
    compared = request.reference in [name for name, *_ in candidates]
    on_spark = request.engine is EvaluationEngine.spark
    if on_spark:
        answered = _answer_on_spark(candidates, examples, request)
    else:
        with tempfile.TemporaryDirectory(prefix="teacher-forced-") as teacher_forced:
            folder = Path(teacher_forced) if compared else None
            answered = {name: _answer(name, uri, run, eval_set, request, folder)
                        for name, _, uri, run in by_reference_first}  # fmt: skip
    results = {name: answered[name] for name, *_ in candidates}
    judgement = judge(results, examples, reference=request.reference, rules=request.gate,
                      policy=request.recommendation,
                      max_quality_drop=request.max_quality_drop)  # fmt: skip
    notes = []
    if on_spark:
        judgement.metrics.update(
            {name: local_only_unmeasured(figures) for name, figures in judgement.metrics.items()}
        )
        notes.append(SPARK_NOTE)
    if random_weights:
        notes.append(RANDOM_WEIGHTS_WARNING)
    notes += [f"{name} was not compared teacher-forced: {result[TEACHER_FORCED_SKIPPED]}"
              for name, result in results.items() if TEACHER_FORCED_SKIPPED in result]  # fmt: skip
    if request.reference not in results:
        notes.append(
            f"Agreement and the teacher-forced figures were not measured: the reference "
            f"candidate '{request.reference}' was not evaluated."
        )
    recommended = judgement.recommended
    evaluation = Evaluation(
        candidates=tuple(
            CandidateResult(
                name, runtime, uri, run, judgement.metrics[name], judgement.verdicts[name]
            )
            for name, runtime, uri, run in candidates
        ),
        reference=request.reference if request.reference in results else None,
        recommendation=Recommendation(
            request.recommendation,
            recommended,
            f"{recommended} passed the gate and ranks first by {request.recommendation.value}"
            if recommended
            else "no candidate passed the gate",
        ),
        random_weights=random_weights,
        dataset=request.dataset,
        dataset_sha256=digest,
        notes=tuple(notes),
    )
    table = frame[["id", "category", "prompt", "reference"]].copy()
    for name, result in results.items():
        answers, scores = result["answers"], judgement.scores[name]
        table[f"{name}_answer"] = [answer["answer"] for answer in answers]
        table[f"{name}_exact_match"] = [score[EXACT_MATCH_METRIC] for score in scores]
        table[f"{name}_token_f1"] = [score[TOKEN_F1_METRIC] for score in scores]
        table[f"{name}_latency_s"] = [answer["latency_s"] for answer in answers]
        table[f"{name}_completion_tokens"] = [answer["completion_tokens"] for answer in answers]
    kl_divergences = {name: result[KL_DIVERGENCES] for name, result in results.items()
                      if KL_DIVERGENCES in result}  # fmt: skip
    _log_outputs(run_id, request, evaluation, table, len(examples), kl_divergences)
    return evaluation


def _log_outputs(run_id: str, request: EvaluateParameters, evaluation: Evaluation,
                 table: pd.DataFrame, example_count: int,
                 kl_divergences: dict[str, list[float]]) -> None:  # fmt: skip
    client = mlflow.MlflowClient()
    mlflow.log_metrics({
        candidate_key(candidate.name, metric): value
        for candidate in evaluation.candidates for metric, value in candidate.metrics.items()
    })  # fmt: skip
    for candidate in evaluation.candidates:
        mlflow.set_tags({
            candidate_key(candidate.name, VALIDATION_STATUS_TAG): candidate.verdict.status,
            candidate_key(candidate.name, VALIDATION_REASONS_TAG):
                candidate.verdict.explanation(),
        })  # fmt: skip
        verdict_tags = {
            VALIDATION_STATUS_TAG: candidate.verdict.status,
            VALIDATION_REASONS_TAG: candidate.verdict.explanation(),
            EVALUATION_RUN_ID_TAG: run_id,
        }
        if candidate.model_uri.startswith("models:/m-"):
            client.set_logged_model_tags(candidate.model_uri.removeprefix("models:/"), verdict_tags)
        else:
            # A model logged as run artifacts has no LoggedModel: its run carries the verdict.
            for key, value in verdict_tags.items():
                client.set_tag(candidate.run_id, run_verdict_key(key), value)
    recommended = evaluation.recommendation.candidate
    mlflow.set_tags({
        RECOMMENDED_CANDIDATE_TAG: recommended or "none",
        RECOMMENDED_MODEL_URI_TAG: evaluation.candidate(recommended).model_uri if recommended
        else "",
        RECOMMENDATION_POLICY_TAG: request.recommendation.value,
    })  # fmt: skip
    mlflow.log_text(evaluation.to_json(), EVALUATION_FILE)
    mlflow.log_table(table, EVAL_TABLE_ARTIFACT)
    settings = {
        "evaluation set": request.dataset, "evaluation set sha256": evaluation.dataset_sha256,
        "prompts": example_count, "max_tokens": request.max_tokens, "decoding": "greedy",
        "batch size": request.batch_size, "engine": request.engine.value,
        "requests timed for time to first token": request.ttft_requests,
        "gate": format_gate(request.gate) or "(none)",
        "largest quality drop allowed below the reference": request.max_quality_drop,
        "reference candidate": request.reference,
        **{f"{c.name} model": c.model_uri for c in evaluation.candidates},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:
        write_report(Path(scratch), evaluation, table, settings, kl_divergences)
        mlflow.log_artifacts(scratch)
    announce_outputs(client, run_id, {
        EVALUATION_OUTPUT: f"runs:/{run_id}/{EVALUATION_FILE}",
        REPORT_OUTPUT: f"runs:/{run_id}/{REPORT_ARTIFACT}",
    })  # fmt: skip
    for candidate in evaluation.candidates:
        reasons = "" if candidate.verdict.passed else f" ({candidate.verdict.explanation()})"
        logger.info("%s: %s%s", candidate.name, candidate.verdict.status, reasons)
    logger.info("recommended: %s", recommended or "none (no candidate passed the gate)")


if __name__ == "__main__":
    run_command_line("evaluate", evaluate)

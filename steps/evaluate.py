"""Entry point ``evaluate``: both logged models side by side on quality, agreement, speed, memory.

Reads (MLproject parameters):
    log_transformers_run_id, log_onnx_run_id: the upstream runs; either may be empty, and the step
        evaluates the models that exist and says which are missing.
    dataset: the evaluation set (JSONL; a path inside the project, an absolute path, or an MLflow
        artifact URI); dataset_sha256: its expected content hash (empty: not checked).
    limit (0: all), max_tokens, batch_size, ttft_requests: generation settings (greedy).
    gate: thresholds such as ``exact_match>=0.5,latency_p95_s<=30``; recommendation: the policy
        that names the model to ship among those that passed.

Writes (on its own run):
    metrics ``<model>.<metric>`` and ``agreement.<metric>``; the per-prompt table
    ``eval_table.json`` (``mlflow.log_table``); ``comparison.csv`` and ``comparison.json``;
    ``charts/quality.png``, ``charts/latency.png``, ``charts/speed.png``, ``charts/memory.png``;
    ``report.html`` (self-contained); the evaluation set as a dataset input;
    tags ``<model>.model_uri``, ``<model>.run_id``, ``<model>.validation_status``
    (passed/rejected), ``<model>.validation_reasons``,
    ``recommended_model`` and ``recommended_model_uri``; the same verdict as tags on each
    LoggedModel. A rejected model is a result, not a failure: the step still exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from llm_packager.eval_report import (
    RANDOM_WEIGHTS_WARNING,
    html_report,
    latency_chart,
    memory_chart,
    quality_chart,
    speed_chart,
)
from llm_packager.evaluation import (
    QUALITY_METRICS,
    EvalSetError,
    agreement,
    apply_gate,
    file_sha256,
    load_eval_set,
    parse_gate,
    recommend,
    resolve_eval_set,
    score_answer,
)
from llm_packager.reuse import MODEL_URI_TAG, announce_outputs
from llm_packager.step_run import exit_process, run_step

MODEL_NAMES = ("transformers", "onnx")
logger = logging.getLogger(__name__)


class ModelUnusableError(ValueError):
    """An upstream model could not be loaded or did not answer."""


@dataclass(frozen=True)
class EvaluateRequest:
    """Mirrors the entry point's parameters."""

    log_transformers_run_id: str = ""
    log_onnx_run_id: str = ""
    dataset: str = "data/eval_set.jsonl"
    dataset_sha256: str = ""
    limit: int = 0
    max_tokens: int = 32
    batch_size: int = 1
    ttft_requests: int = 5
    gate: str = ""
    recommendation: str = "fastest_passed"


@dataclass(frozen=True)
class EvaluateResult:
    """The verdicts and the recommendation."""

    verdicts: dict[str, tuple[str, list[str]]]
    recommended: str | None
    metrics: dict[str, dict[str, float]]


def _upstream_models(request: EvaluateRequest) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """``{name: (model_uri, run_id)}`` for the models given, and notes on those missing."""
    client = mlflow.MlflowClient()
    models, notes = {}, []
    for name, run_id in zip(MODEL_NAMES, (request.log_transformers_run_id, request.log_onnx_run_id),
                            strict=True):  # fmt: skip
        if not run_id:
            notes.append(f"The {name} model was not evaluated: no log_{name} run was given.")
            continue
        uri = client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
        if not uri:
            raise ModelUnusableError(f"log_{name} run {run_id} announces no model (no model URI)")
        models[name] = (uri, run_id)
    if not models:
        raise ValueError("evaluate needs a log_transformers or a log_onnx run; neither was given")
    return models, notes


def _random_weights(models: dict[str, tuple[str, str]]) -> bool:
    client = mlflow.MlflowClient()
    return any(
        client.get_run(run_id).data.tags.get("synthetic.random_weights") == "true"
        for _, run_id in models.values()
    )


def _answer(name: str, uri: str, run_id: str, eval_set: Path, request: EvaluateRequest) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"eval-{name}-") as scratch:
        output = Path(scratch) / "answers.json"
        command = [
            sys.executable, "-m", "llm_packager.eval_worker", "--model-uri", uri,
            "--eval-set", str(eval_set), "--limit", str(request.limit),
            "--max-tokens", str(request.max_tokens), "--batch-size", str(request.batch_size),
            "--ttft-requests", str(request.ttft_requests), "--label", name,
            "--output", str(output),
        ]  # fmt: skip
        # Progress goes to the console; the output is kept to explain a failure.
        completed = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},
        )  # fmt: skip
        if completed.returncode != 0 or not output.exists():
            tail = " | ".join(line for line in completed.stdout.splitlines()[-8:] if line.strip())
            raise ModelUnusableError(
                f"The {name} model {uri} (log_{name} run {run_id}) could not be loaded or did "
                f"not answer: {tail[-1500:]}"
            )
        return json.loads(output.read_text())


def _model_metrics(result: dict, scores: list[dict[str, float]]) -> dict[str, float]:
    answers = result["answers"]
    latencies = [answer["latency_s"] for answer in answers]
    ttft = result["ttft_s"] or 0.0
    decode_time = sum(latencies) - ttft * len(answers)
    decode_tokens = sum(max(answer["completion_tokens"] - 1, 0) for answer in answers)
    if decode_time > 0 and decode_tokens > 0:
        decode_rate = decode_tokens / decode_time
    else:
        # Answers too short to separate decoding from the first token: report throughput.
        decode_rate = sum(answer["completion_tokens"] for answer in answers) / sum(latencies)
    metrics = {name: statistics.fmean(score[name] for score in scores) for name in QUALITY_METRICS}
    metrics |= {
        "decode_tokens_per_s": decode_rate,
        "ttft_s": ttft,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": statistics.quantiles(latencies, n=20, method="inclusive")[-1]
        if len(latencies) > 1 else latencies[0],
        "load_seconds": result["load_seconds"],
        "peak_rss_load_mib": result["peak_rss_load_mib"],
        "peak_rss_generate_mib": result["peak_rss_generate_mib"],
        "model_size_bytes": float(result["model_size_bytes"]),
        "model_size_mib": result["model_size_bytes"] / 2**20,
    }  # fmt: skip
    return metrics


def evaluate(request: EvaluateRequest, run_id: str) -> EvaluateResult:
    """Answer the evaluation set with each model, score and compare them, apply the gate."""
    eval_set = resolve_eval_set(request.dataset)
    digest = file_sha256(eval_set)
    if request.dataset_sha256 and digest != request.dataset_sha256:
        raise EvalSetError(
            f"Evaluation set {request.dataset} changed: sha256 {digest}, expected "
            f"{request.dataset_sha256}; rerun main so the new content is recorded"
        )
    examples = load_eval_set(eval_set, request.limit)
    rules = parse_gate(request.gate)
    models, notes = _upstream_models(request)
    random_weights = _random_weights(models)
    frame = pd.DataFrame([vars(example) for example in examples])
    mlflow.log_input(
        mlflow.data.from_pandas(frame, source=request.dataset, name=eval_set.name),
        context="evaluation",
    )
    mlflow.set_tags({"dataset_sha256": digest, "random_weights": str(random_weights).lower()})

    results = {
        name: _answer(name, uri, rid, eval_set, request) for name, (uri, rid) in models.items()
    }
    table = frame[["id", "category", "prompt", "reference"]].copy()
    metrics: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        answers = [answer["answer"] for answer in result["answers"]]
        scores = [score_answer(a, e.reference) for a, e in zip(answers, examples, strict=True)]
        metrics[name] = _model_metrics(result, scores)
        table[f"{name}_answer"] = answers
        table[f"{name}_exact_match"] = [score["exact_match"] for score in scores]
        table[f"{name}_token_f1"] = [score["token_f1"] for score in scores]
        table[f"{name}_latency_s"] = [answer["latency_s"] for answer in result["answers"]]
        table[f"{name}_completion_tokens"] = [a["completion_tokens"] for a in result["answers"]]
    agreement_metrics = {}
    if len(results) == 2:
        agreement_metrics = agreement(
            list(table["transformers_answer"]), list(table["onnx_answer"])
        )
    else:
        notes.append("Agreement between the models needs both; it was not measured.")
    if random_weights:
        notes.insert(0, RANDOM_WEIGHTS_WARNING)

    verdicts = {name: apply_gate(rules, figures) for name, figures in metrics.items()}
    recommended = recommend(request.recommendation, metrics, {n: v[0] for n, v in verdicts.items()})
    _log_outputs(run_id, request, models, metrics, agreement_metrics, verdicts, recommended,
                 table, notes, random_weights, digest, len(examples))  # fmt: skip
    return EvaluateResult(verdicts, recommended, metrics)


def _log_outputs(run_id, request, models, metrics, agreement_metrics, verdicts, recommended,
                 table, notes, random_weights, digest, example_count) -> None:  # fmt: skip
    client = mlflow.MlflowClient()
    flat = {
        f"{name}.{key}": value
        for name, figures in metrics.items()
        for key, value in figures.items()
    }
    flat |= {f"agreement.{key}": value for key, value in agreement_metrics.items()}
    mlflow.log_metrics(flat)
    for name, (status, reasons) in verdicts.items():
        mlflow.set_tags(
            {
                f"{name}.model_uri": models[name][0],
                f"{name}.run_id": models[name][1],
                f"{name}.validation_status": status,
                f"{name}.validation_reasons": "; ".join(reasons) or "all thresholds met",
            }
        )
        model_id = models[name][0].removeprefix("models:/")
        client.set_logged_model_tags(model_id, {
            "validation_status": status,
            "validation_reasons": "; ".join(reasons) or "all thresholds met",
            "evaluation_run_id": run_id,
        })  # fmt: skip
    mlflow.set_tags({
        "recommended_model": recommended or "none",
        "recommended_model_uri": models[recommended][0] if recommended else "",
        "recommendation_policy": request.recommendation,
    })  # fmt: skip
    mlflow.log_table(table, "eval_table.json")
    comparison = pd.DataFrame(metrics)
    for key, value in agreement_metrics.items():
        comparison.loc[f"agreement.{key}", list(metrics)] = value
    per_category = table.groupby("category")[[f"{n}_exact_match" for n in metrics]].mean()
    settings = {
        "evaluation set": request.dataset, "evaluation set sha256": digest,
        "prompts": example_count, "max_tokens": request.max_tokens, "decoding": "greedy",
        "batch size": request.batch_size, "requests timed for time to first token":
        request.ttft_requests, "gate": request.gate or "(none)",
        **{f"{name} model": uri for name, (uri, _) in models.items()},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:
        folder = Path(scratch)
        comparison.to_csv(folder / "comparison.csv")
        (folder / "comparison.json").write_text(comparison.to_json(indent=2))
        charts_folder = folder / "charts"
        charts_folder.mkdir()
        note = "random weights: these numbers mean nothing" if random_weights else ""
        charts = [
            quality_chart(metrics, charts_folder / "quality.png", note=note),
            latency_chart({n: list(table[f"{n}_latency_s"]) for n in metrics},
                          charts_folder / "latency.png"),
            speed_chart(metrics, charts_folder / "speed.png"),
            memory_chart(metrics, charts_folder / "memory.png"),
        ]  # fmt: skip
        report = html_report(
            comparison=comparison, per_category=per_category, verdicts=verdicts,
            recommended=recommended, policy=request.recommendation, settings=settings,
            notes=notes, charts=charts, random_weights=random_weights,
        )  # fmt: skip
        (folder / "report.html").write_text(report, encoding="utf-8")
        mlflow.log_artifacts(str(folder))
    announce_outputs(client, run_id, {
        "report": f"runs:/{run_id}/report.html",
        "comparison": f"runs:/{run_id}/comparison.json",
    })  # fmt: skip
    for name, (status, reasons) in verdicts.items():
        logger.info("%s: %s%s", name, status, f" ({'; '.join(reasons)})" if reasons else "")
    logger.info("recommended: %s", recommended or "none (no model passed the gate)")


def _parse_arguments(argv: list[str]) -> EvaluateRequest:
    parser = argparse.ArgumentParser(description="Compare the logged models.")
    parser.add_argument("--log-transformers-run-id", default="")
    parser.add_argument("--log-onnx-run-id", default="")
    parser.add_argument("--dataset", default="data/eval_set.jsonl")
    parser.add_argument("--dataset-sha256", default="")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ttft-requests", type=int, default=5)
    parser.add_argument("--gate", default="")
    parser.add_argument("--recommendation", default="fastest_passed")
    arguments = parser.parse_args(argv)
    return EvaluateRequest(**{key: value for key, value in vars(arguments).items()})


if __name__ == "__main__":
    evaluate_request = _parse_arguments(sys.argv[1:])
    exit_process(run_step("evaluate", lambda run_id: evaluate(evaluate_request, run_id)))

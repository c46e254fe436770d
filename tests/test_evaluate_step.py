"""The evaluate step on the tiny model's two logged models, in a throwaway SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import mlflow
import pytest

from llm_packager.eval_report import RANDOM_WEIGHTS_WARNING
from llm_packager.evaluation import MODEL_METRICS, EvalSetError
from llm_packager.project import PROJECT_DIR
from steps.evaluate import EvaluateRequest, ModelUnusableError, evaluate

from .support import project_environment

LIMIT = 6
RANDOM_WEIGHTS_GATE = "contains_reference>=0,exact_match>=0,latency_p95_s<=30"


def _evaluate(runs, **options):
    request = EvaluateRequest(
        log_transformers_run_id=runs["log_transformers"], log_onnx_run_id=runs["log_onnx"],
        limit=LIMIT, max_tokens=8, ttft_requests=2, gate=RANDOM_WEIGHTS_GATE,
    )  # fmt: skip
    request = EvaluateRequest(**{**vars(request), **options})
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        result = evaluate(request, run.info.run_id)
    return run.info.run_id, result


def test_both_models_are_compared_with_every_output(logged_models_tracking, tmp_path):
    client, runs = logged_models_tracking
    run_id, result = _evaluate(runs)
    run = client.get_run(run_id)

    for model in ("transformers", "onnx"):
        for metric in MODEL_METRICS:
            assert f"{model}.{metric}" in run.data.metrics
        assert run.data.tags[f"{model}.validation_status"] == "passed"
        uri = client.get_run(runs[f"log_{model}"]).data.tags["llm_packager.model_uri"]
        model_tags = client.get_logged_model(uri.removeprefix("models:/")).tags
        assert model_tags["validation_status"] == "passed"
        assert model_tags["evaluation_run_id"] == run_id
    assert {"agreement.identical_rate", "agreement.token_agreement"} <= set(run.data.metrics)
    # fastest_passed: the passed model with the higher measured decode speed (which one that is
    # on six tiny prompts depends on machine load, so the policy is checked, not the winner).
    fastest = max(result.metrics, key=lambda name: result.metrics[name]["decode_tokens_per_s"])
    assert run.data.tags["recommended_model"] == result.recommended == fastest
    assert run.data.tags["random_weights"] == "true"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "eval_set.jsonl"

    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/", dst_path=str(tmp_path)))
    table = json.loads((folder / "eval_table.json").read_text())
    assert len(table["data"]) == LIMIT
    assert {"prompt", "reference", "transformers_answer", "onnx_answer", "onnx_latency_s"} <= set(
        table["columns"]
    )
    assert "decode_tokens_per_s" in (folder / "comparison.csv").read_text()
    assert set(json.loads((folder / "comparison.json").read_text())) == {"transformers", "onnx"}
    for chart in ("quality", "latency", "speed", "memory"):
        height, width, _ = matplotlib.image.imread(folder / "charts" / f"{chart}.png").shape
        assert height > 300 and width > 500
    report = (folder / "report.html").read_text()
    assert RANDOM_WEIGHTS_WARNING in report
    assert report.count("data:image/png;base64,") == 4
    assert f"Recommended model: <b>{fastest}</b>" in report


def test_gate_the_model_cannot_meet_rejects_it_with_reasons_and_exits_0(logged_models_tracking):
    client, runs = logged_models_tracking
    completed = subprocess.run(
        [sys.executable, "-m", "steps.evaluate",
         "--log-transformers-run-id", runs["log_transformers"],
         "--log-onnx-run-id", runs["log_onnx"],
         "--limit", "3", "--max-tokens", "4", "--ttft-requests", "1", "--gate", "exact_match>=0.9"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600,
        env=project_environment(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
                                MLFLOW_EXPERIMENT_ID=runs["experiment_id"]),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    (run,) = client.search_runs([runs["experiment_id"]], "tags.recommended_model = 'none'")
    for model in ("transformers", "onnx"):
        assert run.data.tags[f"{model}.validation_status"] == "rejected"
        assert run.data.tags[f"{model}.validation_reasons"] == "exact_match 0 < 0.9"
    assert run.info.status == "FINISHED"


def test_one_model_alone_is_evaluated_and_the_other_reported_missing(logged_models_tracking):
    client, runs = logged_models_tracking
    run_id, result = _evaluate(runs, log_transformers_run_id="")
    assert set(result.metrics) == {"onnx"}
    assert "agreement.identical_rate" not in client.get_run(run_id).data.metrics
    report = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/report.html")).read_text()
    assert "The transformers model was not evaluated: no log_transformers run was given." in report


def test_upstream_model_that_cannot_be_loaded_is_named(logged_models_tracking):
    _, runs = logged_models_tracking
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as broken:
        mlflow.set_tag("llm_packager.model_uri", "models:/m-0123456789abcdef0123456789abcdef")
    with pytest.raises(
        ModelUnusableError,
        match=rf"^The onnx model models:/m-0123456789abcdef0123456789abcdef \(log_onnx run "
        rf"{broken.info.run_id}\) could not be loaded or did not answer: ",
    ):
        _evaluate(runs, log_onnx_run_id=broken.info.run_id)


def test_changed_eval_set_is_detected(logged_models_tracking):
    _, runs = logged_models_tracking
    with pytest.raises(EvalSetError, match=r"changed: sha256 .* expected 0+; rerun main"):
        _evaluate(runs, dataset_sha256="0" * 64)

"""The register step: alias only past the gate, idempotent versions, lineage on the version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow

from llm_packager.project import PROJECT_DIR
from steps.evaluate import EvaluateRequest, evaluate
from steps.register import RegisterRequest, register

from .support import project_environment

PASSING_GATE = "exact_match>=0,latency_p95_s<=30"
FAILING_GATE = "exact_match>=0.9"


def _evaluation(runs, gate: str) -> str:
    request = EvaluateRequest(
        log_transformers_run_id=runs["log_transformers"], log_onnx_run_id=runs["log_onnx"],
        limit=3, max_tokens=4, ttft_requests=1, gate=gate,
    )  # fmt: skip
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        evaluate(request, run.info.run_id)
    return run.info.run_id


def _register(runs, evaluate_run_id: str, name: str, **options):
    request = RegisterRequest(
        evaluate_run_id=evaluate_run_id, registered_model_name=name, **options
    )
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        result = register(request, run.info.run_id)
    return run.info.run_id, result


def test_winner_gets_champion_other_gets_challenger_with_lineage(logged_models_tracking):
    client, runs = logged_models_tracking
    evaluate_run_id = _evaluation(runs, PASSING_GATE)
    register_run_id, result = _register(runs, evaluate_run_id, "lineage-test")

    # Which model is faster on three tiny prompts is noise; register must follow the evaluation.
    winner = client.get_run(evaluate_run_id).data.tags["recommended_model"]
    other = {"onnx": "transformers", "transformers": "onnx"}[winner]
    assert result.status == "registered" and result.model == winner
    aliases = client.get_registered_model("lineage-test").aliases
    champion = client.get_model_version_by_alias("lineage-test", "champion")
    challenger = client.get_model_version_by_alias("lineage-test", "challenger")
    assert aliases == {"champion": champion.version, "challenger": challenger.version}
    assert champion.status == challenger.status == "READY"
    winner_uri = client.get_run(runs[f"log_{winner}"]).data.tags["llm_packager.model_uri"]
    assert champion.source == winner_uri
    flavors = {"onnx": "python_function (onnxruntime-genai)", "transformers": "transformers"}
    tags = champion.tags
    assert tags["flavor"] == flavors[winner]
    assert tags["validation_status"] == "passed"
    assert tags["run.fetch_model"] == runs["fetch_model"]
    assert tags[f"run.log_{winner}"] == runs[f"log_{winner}"]
    assert tags["run.evaluate"] == evaluate_run_id
    assert tags["run.register"] == register_run_id
    assert tags["random_weights"] == "true"
    assert {
        "git_commit",
        "code_version",
        "metric.exact_match",
        "metric.decode_tokens_per_s",
    } <= set(tags)
    assert "Random weights: quality figures mean nothing." in champion.description
    assert challenger.tags["flavor"] == flavors[other]
    decision = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{register_run_id}/registration.json")).read_text())  # fmt: skip
    assert decision["aliases"] == aliases
    answer = mlflow.pyfunc.load_model("models:/lineage-test@champion").predict(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert answer[0]["object"] == "chat.completion"


def test_registering_the_same_model_again_returns_the_existing_version(logged_models_tracking):
    client, runs = logged_models_tracking
    evaluate_run_id = _evaluation(runs, PASSING_GATE)
    _, first = _register(runs, evaluate_run_id, "idempotent-test")
    _, again = _register(runs, evaluate_run_id, "idempotent-test")
    assert again.version == first.version
    assert len(client.search_model_versions("name = 'idempotent-test'")) == 2  # onnx + transformers


def test_no_model_past_the_gate_registers_nothing_and_keeps_aliases(logged_models_tracking):
    client, runs = logged_models_tracking
    _register(runs, _evaluation(runs, PASSING_GATE), "gate-test")
    before = client.get_registered_model("gate-test").aliases
    versions_before = len(client.search_model_versions("name = 'gate-test'"))
    failing = _evaluation(runs, FAILING_GATE)

    completed = subprocess.run(
        [sys.executable, "-m", "steps.register", "--evaluate-run-id", failing,
         "--registered-model-name", "gate-test"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300,
        env=project_environment(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
                                MLFLOW_EXPERIMENT_ID=runs["experiment_id"]),
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    assert "Model not registered: no model passed the evaluation gate (transformers: " in (
        completed.stderr
    )
    assert client.get_registered_model("gate-test").aliases == before
    assert len(client.search_model_versions("name = 'gate-test'")) == versions_before
    (run,) = client.search_runs([runs["experiment_id"]], "tags.registration_status = 'skipped'")
    assert "exact_match 0 < 0.9" in run.data.tags["registration_reason"]


def test_allow_unvalidated_registers_and_says_so(logged_models_tracking):
    client, runs = logged_models_tracking
    _, result = _register(runs, _evaluation(runs, FAILING_GATE), "unvalidated-test",
                          allow_unvalidated=True)  # fmt: skip
    assert result.status == "registered"
    champion = client.get_model_version_by_alias("unvalidated-test", "champion")
    assert champion.tags["registered_unvalidated"] == "true"
    assert champion.tags["validation_status"] == "rejected"
    assert "challenger" not in client.get_registered_model("unvalidated-test").aliases

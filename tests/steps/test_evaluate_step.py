"""The evaluate step on the tiny model's logged candidates, in a throwaway SQLite store.

Each evaluation loads every candidate in a worker process of its own, so these tests are slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import mlflow
import pytest

from llm_packager.choices import RecommendationPolicy
from llm_packager.config.specs import EvaluateParameters
from llm_packager.evaluation.metrics import MODEL_METRICS, parse_gate
from llm_packager.evaluation.record import Evaluation
from llm_packager.evaluation.report import RANDOM_WEIGHTS_WARNING
from llm_packager.evaluation.scoring import EvalSetError, rank
from llm_packager.keys import (
    CANDIDATE_TAG,
    MODEL_URI_TAG,
    RECOMMENDED_CANDIDATE_TAG,
    REPORT_ARTIFACT,
    RUNTIME_TAG,
    VALIDATION_STATUS_TAG,
    candidate_key,
)
from llm_packager.project import PROJECT_DIR
from steps.evaluate import ModelUnusableError, evaluate
from tests.support import run_step

pytestmark = pytest.mark.slow

LIMIT = 6
RANDOM_WEIGHTS_GATE = parse_gate("contains_reference>=0,exact_match>=0,latency_p95_s<=30")


def _evaluate(runs, candidate_run_ids=None, **options):
    request = EvaluateParameters(
        candidate_run_ids=candidate_run_ids or (runs["log_transformers"], runs["log_onnx"]),
        limit=LIMIT, max_tokens=8, ttft_requests=2, gate=RANDOM_WEIGHTS_GATE, **options,
    )  # fmt: skip
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        result = evaluate(request, run.info.run_id)
    return run.info.run_id, result


def _candidate_run(runs, name: str, model_uri: str) -> str:
    """A run that presents an already logged model as another candidate."""
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        mlflow.set_tags({CANDIDATE_TAG: name, RUNTIME_TAG: "onnx", MODEL_URI_TAG: model_uri})
    return run.info.run_id


def test_every_candidate_is_compared_with_every_output_and_a_third_with_the_reference(
    logged_models_tracking, tmp_path
):
    # Both logged models, and the ONNX one again as a third candidate of another name: one
    # evaluation (a worker process per candidate) serves the two-model outputs and the third's.
    client, runs = logged_models_tracking
    onnx_uri = client.get_run(runs["log_onnx"]).data.tags[MODEL_URI_TAG]
    third = _candidate_run(runs, "onnx-again", onnx_uri)
    run_id, result = _evaluate(runs, (runs["log_transformers"], runs["log_onnx"], third))
    run = client.get_run(run_id)
    names = ["transformers", "onnx", "onnx-again"]

    assert result.names() == names
    assert Evaluation.load(run_id) == result
    for candidate in result.candidates:
        assert set(candidate.metrics) == set(MODEL_METRICS)
        for metric in MODEL_METRICS:
            assert run.data.metrics[f"{candidate.name}.{metric}"] == pytest.approx(
                candidate.metrics[metric]
            )
        assert candidate.verdict.passed
        assert run.data.tags[candidate_key(candidate.name, VALIDATION_STATUS_TAG)] == "passed"
        model_tags = client.get_logged_model(candidate.model_uri.removeprefix("models:/")).tags
        assert model_tags[VALIDATION_STATUS_TAG] == "passed"
        assert model_tags["evaluation_run_id"] == run_id
    assert result.reference == "transformers"
    assert result.candidate("transformers").metrics["identical_rate"] == 1.0
    # The same greedy model answers the same: the third candidate agrees with the reference
    # exactly as much as the second does.
    for metric in ("identical_rate", "token_agreement", "exact_match", "token_f1"):
        assert (
            result.candidate("onnx-again").metrics[metric]
            == result.candidate("onnx").metrics[metric]
        )
    # fastest_passed: the passed candidate with the highest measured decode speed (which one that
    # is on six tiny prompts depends on machine load, so the policy is checked, not the winner).
    metrics = {c.name: c.metrics for c in result.candidates}
    fastest = rank(RecommendationPolicy.fastest_passed, metrics)[0]
    assert run.data.tags[RECOMMENDED_CANDIDATE_TAG] == result.recommendation.candidate == fastest
    assert run.data.tags["random_weights"] == "true"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "eval_set.jsonl"

    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/", dst_path=str(tmp_path)))
    table = json.loads((folder / "eval_table.json").read_text())
    assert len(table["data"]) == LIMIT
    assert {"prompt", "reference", "transformers_answer", "onnx_answer", "onnx_latency_s",
            "onnx-again_answer"} <= set(table["columns"])  # fmt: skip
    assert "decode_tokens_per_s" in (folder / "comparison.csv").read_text()
    assert set(json.loads((folder / "comparison.json").read_text())) == set(names)
    for chart in ("quality", "latency", "speed", "memory"):
        height, width, _ = matplotlib.image.imread(folder / "charts" / f"{chart}.png").shape
        assert height > 300 and width > 500
    report = (folder / REPORT_ARTIFACT).read_text()
    assert "<h1>Model comparison: transformers, onnx, onnx-again</h1>" in report
    assert "<h2>Against the reference</h2>" in report
    assert "<td>onnx-again</td><td>onnx</td><td>passed</td>" in report
    assert RANDOM_WEIGHTS_WARNING in report
    assert report.count("data:image/png;base64,") == 5  # four charts and the KL histogram
    assert f"Recommended model: <b>{fastest}</b>" in report


def test_a_gate_no_candidate_can_meet_rejects_all_with_reasons_and_exits_0(logged_models_tracking):
    client, runs = logged_models_tracking
    # The experiment is the session's: other test files on this worker (register's) leave
    # evaluations that recommended nothing too, so this step's run is the one that is new.
    before = {run.info.run_id for run in client.search_runs([runs["experiment_id"]])}
    completed = run_step(
        "evaluate", "--candidate-run-ids", f"{runs['log_transformers']},{runs['log_onnx']}",
        "--limit", "3", "--max-tokens", "4", "--ttft-requests", "1", "--gate", "exact_match>=0.9",
        timeout=600, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
        MLFLOW_EXPERIMENT_ID=runs["experiment_id"],
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    (run,) = [
        run
        for run in client.search_runs(
            [runs["experiment_id"]], f"tags.{RECOMMENDED_CANDIDATE_TAG} = 'none'"
        )
        if run.info.run_id not in before
    ]
    evaluation = Evaluation.load(run.info.run_id)
    assert evaluation.recommendation.candidate is None
    for candidate in evaluation.candidates:
        assert candidate.verdict.reasons == ("exact_match 0 < 0.9",)
        assert run.data.tags[candidate_key(candidate.name, VALIDATION_STATUS_TAG)] == "rejected"
    assert run.info.status == "FINISHED"


def test_one_candidate_alone_is_evaluated_and_agreement_reported_missing(logged_models_tracking):
    client, runs = logged_models_tracking
    run_id, result = _evaluate(runs, (runs["log_onnx"],))
    assert result.names() == ["onnx"]
    assert result.reference is None
    assert "onnx.identical_rate" not in client.get_run(run_id).data.metrics
    report = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/report.html")).read_text()
    assert "Agreement was not measured: the reference candidate was not evaluated." in report


def test_upstream_model_that_cannot_be_loaded_is_named(logged_models_tracking):
    _, runs = logged_models_tracking
    broken = _candidate_run(runs, "broken", "models:/m-0123456789abcdef0123456789abcdef")
    with pytest.raises(
        ModelUnusableError,
        match=rf"^The broken model models:/m-0123456789abcdef0123456789abcdef \(run {broken}\) "
        "could not be loaded or did not answer: ",
    ):
        _evaluate(runs, (broken,))


def test_candidates_must_be_named_and_named_once(logged_models_tracking):
    client, runs = logged_models_tracking
    onnx_uri = client.get_run(runs["log_onnx"]).data.tags[MODEL_URI_TAG]
    twin = _candidate_run(runs, "onnx", onnx_uri)
    with pytest.raises(ValueError, match=r"^two candidate runs are both named 'onnx'$"):
        _evaluate(runs, (runs["log_onnx"], twin))
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as unnamed:
        mlflow.set_tag(MODEL_URI_TAG, onnx_uri)
    with pytest.raises(ModelUnusableError, match=rf"^log run {unnamed.info.run_id} does not name"):
        _evaluate(runs, (unnamed.info.run_id,))


def test_changed_eval_set_is_detected(logged_models_tracking):
    _, runs = logged_models_tracking
    with pytest.raises(EvalSetError, match=r"changed: sha256 .* expected 0+; rerun main"):
        _evaluate(runs, dataset_sha256="0" * 64)


def test_a_model_that_never_answers_is_stopped_and_named(logged_models_tracking):
    _, runs = logged_models_tracking
    with mlflow.start_run(experiment_id=runs["experiment_id"]):
        # Requirements given: inferring them would load the model, which hangs for MLflow's
        # two-minute inference timeout.
        hanging = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PROJECT_DIR / "tests" / "data" / "hanging_chat_model.py"),
            pip_requirements=["mlflow"],
        )
    stuck = _candidate_run(runs, "stuck", hanging.model_uri)
    with pytest.raises(
        ModelUnusableError,
        match=rf"^The stuck model {hanging.model_uri} \(run {stuck}\) did not answer the "
        r"evaluation set within 20 s \(evaluate\.worker_timeout_s\); it was stopped\.",
    ):
        _evaluate(runs, (stuck,), worker_timeout_s=20)

"""The register step: alias only past the gate, idempotent versions, lineage on the version.

The tiny model's candidates are evaluated for real (a worker process per candidate), once per
gate for the module: register never changes an evaluate run, so every test registers the same
passing and failing runs under a model name of its own. These tests are slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from llm_packager.choices import RecommendationPolicy
from llm_packager.config.specs import EvaluateParameters, RegisterParameters
from llm_packager.evaluation.metrics import PASSED, REJECTED, Verdict, parse_gate
from llm_packager.evaluation.record import (
    CandidateResult,
    Evaluation,
    EvaluationRecordError,
    Recommendation,
)
from llm_packager.keys import (
    CANDIDATE_TAG,
    EVALUATION_FILE,
    FLAVOR_TAG,
    GIT_COMMIT_TAG,
    MODEL_URI_TAG,
    RANDOM_WEIGHTS_TAG,
    RECOMMENDED_BY_TAG,
    REGISTERED_UNVALIDATED_TAG,
    REGISTRATION_ARTIFACT,
    REGISTRATION_REASON_TAG,
    REGISTRATION_STATUS_TAG,
    RUNTIME_TAG,
    VALIDATION_STATUS_TAG,
    VERSION_CANDIDATE_TAG,
    VERSION_CODE_VERSION_TAG,
    metric_lineage_key,
    run_lineage_key,
)
from steps.evaluate import evaluate
from steps.register import register
from tests.support import run_step, tracking_uri

pytestmark = pytest.mark.slow

PASSING_GATE = "exact_match>=0,latency_p95_s<=30"
FAILING_GATE = "exact_match>=0.9"
FLAVORS = {"onnx": "python_function (onnxruntime-genai)", "transformers": "transformers"}


def _evaluation(runs, gate: str, candidate_run_ids=None) -> str:
    request = EvaluateParameters(
        candidate_run_ids=candidate_run_ids or (runs["log_transformers"], runs["log_onnx"]),
        limit=3, max_tokens=4, ttft_requests=1, gate=parse_gate(gate),
    )  # fmt: skip
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        evaluate(request, run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def evaluated(logged_models) -> dict[str, str]:
    """The two tiny candidates evaluated under the passing and the failing gate: run ids by gate."""
    uri, runs = logged_models
    with tracking_uri(uri):
        return {gate: _evaluation(runs, gate) for gate in (PASSING_GATE, FAILING_GATE)}


def _register(runs, evaluate_run_id: str, name: str, **options):
    request = RegisterParameters(
        evaluate_run_id=evaluate_run_id, registered_model_name=name, **options
    )
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        result = register(request, run.info.run_id)
    return run.info.run_id, result


def test_winner_gets_champion_runner_up_gets_challenger_with_lineage(
    logged_models_tracking, evaluated
):
    client, runs = logged_models_tracking
    evaluate_run_id = evaluated[PASSING_GATE]
    register_run_id, result = _register(runs, evaluate_run_id, "lineage-test")

    # Which candidate is faster on three tiny prompts is noise; register must follow evaluate.
    evaluation = Evaluation.load(evaluate_run_id)
    winner, other = (candidate.name for candidate in evaluation.ranked())
    assert evaluation.recommendation.candidate == winner
    assert result.status == "registered" and result.candidate == winner
    aliases = client.get_registered_model("lineage-test").aliases
    champion = client.get_model_version_by_alias("lineage-test", "champion")
    challenger = client.get_model_version_by_alias("lineage-test", "challenger")
    assert aliases == {"champion": champion.version, "challenger": challenger.version}
    assert champion.status == challenger.status == "READY"
    assert champion.source == evaluation.candidate(winner).model_uri
    tags = champion.tags
    assert tags[FLAVOR_TAG] == FLAVORS[winner]
    assert tags[VERSION_CANDIDATE_TAG] == winner
    assert tags[VALIDATION_STATUS_TAG] == "passed"
    assert tags[run_lineage_key("fetch_model")] == runs["fetch_model"]
    assert tags[run_lineage_key(f"log_{winner}")] == runs[f"log_{winner}"]
    assert tags[run_lineage_key("evaluate")] == evaluate_run_id
    assert tags[run_lineage_key("register")] == register_run_id
    assert tags[RANDOM_WEIGHTS_TAG] == "true"
    assert {GIT_COMMIT_TAG, VERSION_CODE_VERSION_TAG, metric_lineage_key("exact_match"),
            metric_lineage_key("decode_tokens_per_s")} <= set(tags)  # fmt: skip
    assert "Random weights: quality figures mean nothing." in champion.description
    assert challenger.tags[FLAVOR_TAG] == FLAVORS[other]
    decision = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{register_run_id}/{REGISTRATION_ARTIFACT}")).read_text())  # fmt: skip
    assert decision["aliases"] == aliases
    answer = mlflow.pyfunc.load_model("models:/lineage-test@champion").predict(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert answer[0]["object"] == "chat.completion"


def test_registering_the_same_model_again_returns_the_existing_version(
    logged_models_tracking, evaluated
):
    client, runs = logged_models_tracking
    evaluate_run_id = evaluated[PASSING_GATE]
    _, first = _register(runs, evaluate_run_id, "idempotent-test")
    _, again = _register(runs, evaluate_run_id, "idempotent-test")
    assert again.version == first.version
    assert len(client.search_model_versions("name = 'idempotent-test'")) == 2  # onnx + transformers


def test_no_candidate_past_the_gate_registers_nothing_and_keeps_aliases(
    logged_models_tracking, evaluated
):
    client, runs = logged_models_tracking
    _register(runs, evaluated[PASSING_GATE], "gate-test")
    before = client.get_registered_model("gate-test").aliases
    versions_before = len(client.search_model_versions("name = 'gate-test'"))
    failing = evaluated[FAILING_GATE]

    completed = run_step(
        "register", "--evaluate-run-id", failing, "--registered-model-name", "gate-test",
        MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), MLFLOW_EXPERIMENT_ID=runs["experiment_id"],
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    assert "Model not registered: no model passed the evaluation gate (transformers: " in (
        completed.stderr
    )
    assert client.get_registered_model("gate-test").aliases == before
    assert len(client.search_model_versions("name = 'gate-test'")) == versions_before
    (run,) = client.search_runs(
        [runs["experiment_id"]], f"tags.{REGISTRATION_STATUS_TAG} = 'skipped'"
    )
    assert "exact_match 0 < 0.9" in run.data.tags[REGISTRATION_REASON_TAG]


def test_allow_unvalidated_registers_says_so_and_removes_a_stale_challenger(
    logged_models_tracking, evaluated
):
    client, runs = logged_models_tracking
    _register(runs, evaluated[PASSING_GATE], "unvalidated-test")
    assert "challenger" in client.get_registered_model("unvalidated-test").aliases
    _, result = _register(runs, evaluated[FAILING_GATE], "unvalidated-test",
                          allow_unvalidated=True)  # fmt: skip
    assert result.status == "registered"
    champion = client.get_model_version_by_alias("unvalidated-test", "champion")
    assert champion.tags[REGISTERED_UNVALIDATED_TAG] == "true"
    assert champion.tags[VALIDATION_STATUS_TAG] == "rejected"
    # No second candidate passed, so @challenger no longer points at the earlier run's model.
    assert "challenger" not in client.get_registered_model("unvalidated-test").aliases


def test_with_three_candidates_the_runner_up_by_the_policy_is_the_challenger(
    logged_models_tracking,
):
    client, runs = logged_models_tracking
    onnx_uri = client.get_run(runs["log_onnx"]).data.tags[MODEL_URI_TAG]
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as third:
        mlflow.set_tags({CANDIDATE_TAG: "onnx-again", RUNTIME_TAG: "onnx",
                         MODEL_URI_TAG: onnx_uri})  # fmt: skip
    evaluate_run_id = _evaluation(
        runs, PASSING_GATE, (runs["log_transformers"], runs["log_onnx"], third.info.run_id)
    )
    _, result = _register(runs, evaluate_run_id, "three-test")
    winner, *others = Evaluation.load(evaluate_run_id).ranked()
    assert result.candidate == winner.name
    # The runner-up is the best-ranked candidate that is another model than the winner.
    runner_up = next(c for c in others if c.model_uri != winner.model_uri)
    challenger = client.get_model_version_by_alias("three-test", "challenger")
    assert challenger.tags[VERSION_CANDIDATE_TAG] == runner_up.name
    champion = client.get_model_version_by_alias("three-test", "champion")
    assert champion.tags[VERSION_CANDIDATE_TAG] == winner.name


def test_an_evaluate_run_without_its_contract_is_refused(logged_models_tracking):
    _, runs = logged_models_tracking
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as empty:
        pass
    with pytest.raises(EvaluationRecordError, match=rf"^evaluate run {empty.info.run_id} has no "
                                                    r"evaluation\.json"):  # fmt: skip
        _register(runs, empty.info.run_id, "contract-test")


# Hand-made figures in which each policy picks a different model: transformers is the better and
# bigger one, ONNX the faster and smaller one.
_FIGURES = {
    "transformers": {"token_f1": 0.6, "exact_match": 0.5, "decode_tokens_per_s": 10.0,
                     "latency_p95_s": 2.0, "model_size_bytes": 500e6, "model_size_mib": 476.8},
    "onnx": {"token_f1": 0.4, "exact_match": 0.3, "decode_tokens_per_s": 90.0,
             "latency_p95_s": 0.5, "model_size_bytes": 100e6, "model_size_mib": 95.4},
}  # fmt: skip
_POLICY_PICKS = {
    RecommendationPolicy.fastest_passed: ("onnx", "transformers"),
    RecommendationPolicy.best_quality_passed: ("transformers", "onnx"),
    RecommendationPolicy.smallest_passed: ("onnx", "transformers"),
}


def _hand_made_evaluation(client, runs, policy: RecommendationPolicy, passed: bool) -> str:
    """An evaluate run whose evaluation.json holds `_FIGURES` for the logged tiny models, both
    passed or both rejected, recommending what evaluate's own ranking picks."""
    verdict = Verdict(PASSED) if passed else Verdict(REJECTED, ("exact_match 0.3 < 0.9",))
    candidates = tuple(
        CandidateResult(
            name=name, runtime=name, run_id=runs[f"log_{name}"], verdict=verdict,
            model_uri=client.get_run(runs[f"log_{name}"]).data.tags[MODEL_URI_TAG],
            metrics=figures,
        )
        for name, figures in _FIGURES.items()
    )  # fmt: skip
    recommended = _POLICY_PICKS[policy][0] if passed else None
    evaluation = Evaluation(
        candidates=candidates, reference="transformers", random_weights=True,
        recommendation=Recommendation(policy, recommended, "hand-made for the test"),
        dataset="hand-made", dataset_sha256="0" * 64,
    )  # fmt: skip
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        mlflow.log_text(evaluation.to_json(), EVALUATION_FILE)
    return run.info.run_id


@pytest.mark.parametrize("policy", list(RecommendationPolicy), ids=lambda policy: policy.value)
def test_every_policy_registers_its_pick_with_and_without_allow_unvalidated(
    logged_models_tracking, policy
):
    client, runs = logged_models_tracking
    winner, runner_up = _POLICY_PICKS[policy]
    name = f"policy-{policy.value.replace('_', '-')}"
    passed = _hand_made_evaluation(client, runs, policy, passed=True)
    rejected = _hand_made_evaluation(client, runs, policy, passed=False)

    for allow_unvalidated in (False, True):
        _, result = _register(runs, passed, name, allow_unvalidated=allow_unvalidated)
        assert (result.status, result.candidate) == ("registered", winner)
        champion = client.get_model_version_by_alias(name, "champion")
        challenger = client.get_model_version_by_alias(name, "challenger")
        assert (champion.tags[VERSION_CANDIDATE_TAG], challenger.tags[VERSION_CANDIDATE_TAG]) == (
            winner,
            runner_up,
        )
        assert champion.tags[RECOMMENDED_BY_TAG] == policy.value
        assert REGISTERED_UNVALIDATED_TAG not in champion.tags

    aliases = client.get_registered_model(name).aliases
    _, skipped = _register(runs, rejected, name)
    assert skipped.status == "skipped"
    assert client.get_registered_model(name).aliases == aliases

    _, forced = _register(runs, rejected, name, allow_unvalidated=True)
    # Nothing passed: the policy still picks, among every candidate, and the version says so.
    assert (forced.status, forced.candidate) == ("registered", winner)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags[REGISTERED_UNVALIDATED_TAG] == "true"
    assert champion.tags[VALIDATION_STATUS_TAG] == REJECTED
    assert "challenger" not in client.get_registered_model(name).aliases
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

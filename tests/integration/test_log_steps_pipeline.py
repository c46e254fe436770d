"""The whole pipeline (`steps=all`) against a real server and the embedded default: every step's
outputs, reuse, a new fetch rippling through the log steps to the next evaluation, and an ONNX
variant as a third candidate."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from llm_packager.keys import (
    CANDIDATE_TAG,
    COMPARISON_CSV,
    COMPARISON_JSON,
    EVAL_TABLE_ARTIFACT,
    EVALUATION_FILE,
    MODEL_URI_TAG,
    PIPELINE_STEPS_ARTIFACT,
    RECOMMENDED_CANDIDATE_TAG,
    REGISTRATION_STATUS_TAG,
    REPORT_ARTIFACT,
    STEPS_REUSED_TAG,
    VALIDATION_STATUS_TAG,
    VERSION_CANDIDATE_TAG,
    candidate_key,
    upstream_tag,
)
from tests.support import TrackingServer, mlflow_run_main, runs_of

pytestmark = pytest.mark.slow

EXPERIMENT = "log-steps-test"
STEPS = ("model=tiny-random-phi3",)  # steps=all is the default
# Fewer prompts keep the repeated server runs short; the embedded run evaluates them all.
SHORT_EVALUATION = "overrides=evaluate.limit=8"
LOG_STEPS = ("log_transformers", "log_onnx")
CHAT_INPUTS = {"messages", "temperature", "max_tokens", "stop", "n", "stream"}
CHAT_OUTPUTS = {"id", "object", "created", "model", "choices", "usage"}


def _check_chat_model(client: MlflowClient, run) -> str:
    model_uri = run.data.tags[MODEL_URI_TAG]
    assert model_uri.startswith("models:/m-")
    info = mlflow.models.get_model_info(model_uri)
    assert {spec.name for spec in info.signature.inputs} >= CHAT_INPUTS
    assert {spec.name for spec in info.signature.outputs} >= CHAT_OUTPUTS
    assert (
        client.get_logged_model(model_uri.removeprefix("models:/")).source_run_id == run.info.run_id
    )
    return model_uri


@pytest.fixture
def server(tracking_server: TrackingServer, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
    return MlflowClient(tracking_uri=tracking_server.uri)


def _check_evaluation(client: MlflowClient, run, models: set[str]) -> None:
    assert run.info.status == "FINISHED"
    for model in models:
        assert run.data.tags[candidate_key(model, VALIDATION_STATUS_TAG)] == "passed"
    artifacts = {info.path for info in client.list_artifacts(run.info.run_id)}
    assert {EVALUATION_FILE, EVAL_TABLE_ARTIFACT, COMPARISON_CSV, COMPARISON_JSON,
            REPORT_ARTIFACT} <= artifacts  # fmt: skip
    charts = {info.path for info in client.list_artifacts(run.info.run_id, "charts")}
    assert charts == {
        f"charts/{name}.png" for name in ("quality", "latency", "speed", "memory", "kl_divergence")
    }


def test_server_logs_reuses_relogs_after_a_new_fetch_and_takes_a_variant_as_third_candidate(
    tmp_path, tracking_server, server
):
    env = {"MLFLOW_TRACKING_URI": tracking_server.uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    completed = mlflow_run_main(tmp_path, *STEPS, SHORT_EVALUATION, **env)
    assert completed.returncode == 0, completed.stderr
    (fetch,) = runs_of(server, EXPERIMENT, "fetch_model")
    first_models = {}
    for step in LOG_STEPS:
        (logged,) = runs_of(server, EXPERIMENT, step)
        assert logged.data.params["fetch_model_run_id"] == fetch.info.run_id
        assert logged.data.tags[upstream_tag("fetch_model")] == fetch.info.run_id
        first_models[step] = _check_chat_model(server, logged)
    assert runs_of(server, EXPERIMENT, "log_onnx")[0].data.params["precision"] == "int4"
    (evaluation,) = runs_of(server, EXPERIMENT, "evaluate")
    _check_evaluation(server, evaluation, {"transformers", "onnx"})
    speeds = {
        m: evaluation.data.metrics[f"{m}.decode_tokens_per_s"] for m in ("transformers", "onnx")
    }
    fastest = max(speeds, key=speeds.get)
    assert evaluation.data.tags[RECOMMENDED_CANDIDATE_TAG] == fastest
    assert evaluation.data.tags["recommended_model_uri"] == first_models[f"log_{fastest}"]

    champion = server.get_model_version_by_alias("tiny-random-phi3-chat", "champion")
    assert champion.source == evaluation.data.tags["recommended_model_uri"]

    completed = mlflow_run_main(tmp_path, *STEPS, SHORT_EVALUATION, **env)
    assert completed.returncode == 0, completed.stderr
    for step in (*LOG_STEPS, "evaluate", "register"):
        assert len(runs_of(server, EXPERIMENT, step)) == 1
    assert runs_of(server, EXPERIMENT, "main")[0].data.tags[STEPS_REUSED_TAG] == (
        "fetch_model,log_transformers,log_onnx,evaluate,register"
    )
    assert len(server.search_model_versions("name = 'tiny-random-phi3-chat'")) == 2

    # A new fetch relogs both models. This run stops after the log steps, to spare an evaluate
    # and register; the next run's evaluation takes the relogged runs, which shows the new fetch
    # reaching evaluate. (A gate no model passes is test_register's.)
    completed = mlflow_run_main(tmp_path, *STEPS, "force=fetch_model",
                                "steps=fetch_model,log_transformers,log_onnx", **env)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    new_fetch, _ = runs_of(server, EXPERIMENT, "fetch_model")
    relogged_runs = {}
    for step in LOG_STEPS:
        relogged, _ = runs_of(server, EXPERIMENT, step)
        assert relogged.data.params["fetch_model_run_id"] == new_fetch.info.run_id
        assert _check_chat_model(server, relogged) != first_models[step]
        relogged_runs[step] = relogged.info.run_id
    assert len(runs_of(server, EXPERIMENT, "evaluate")) == 1

    # An ONNX variant is a third candidate from its log to the registry. The steps it leaves
    # alone are reused (the relogged ones): the variant adds its own log_onnx run, and a new
    # evaluate of the relogged models and the variant, and a new register.
    third = "third-candidate-chat"
    completed = mlflow_run_main(
        tmp_path, *STEPS,
        "overrides=onnx.variants={int8:{precision:int8}} evaluate.limit=8 "
        f"register.registered_model_name={third}",
        **env,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    main_run = runs_of(server, EXPERIMENT, "main")[0]
    assert main_run.data.tags[STEPS_REUSED_TAG] == "fetch_model,log_transformers,log_onnx"
    record = json.loads(Path(server.download_artifacts(
        main_run.info.run_id, PIPELINE_STEPS_ARTIFACT)).read_text())  # fmt: skip
    assert list(record) == ["fetch_model", "log_transformers", "log_onnx", "log_onnx:int8",
                            "evaluate", "register"]  # fmt: skip
    variant = server.get_run(record["log_onnx:int8"]["run_id"])
    assert variant.data.tags[CANDIDATE_TAG] == "onnx-int8"
    assert variant.data.params["precision"] == "int8"
    assert variant.data.params["fetch_model_run_id"] == new_fetch.info.run_id
    _check_chat_model(server, variant)
    assert {step: record[step]["run_id"] for step in LOG_STEPS} == relogged_runs
    evaluation = server.get_run(record["evaluate"]["run_id"])
    assert evaluation.data.params["candidate_run_ids"] == ",".join(
        record[name]["run_id"] for name in ("log_transformers", "log_onnx", "log_onnx:int8")
    )
    assert len(runs_of(server, EXPERIMENT, "evaluate")) == 2
    for name in ("transformers", "onnx", "onnx-int8"):
        assert evaluation.data.tags[candidate_key(name, VALIDATION_STATUS_TAG)] == "passed"
    champion = server.get_model_version_by_alias(third, "champion")
    assert champion.source == evaluation.data.tags["recommended_model_uri"]
    assert champion.tags[VERSION_CANDIDATE_TAG] == evaluation.data.tags[RECOMMENDED_CANDIDATE_TAG]


def test_embedded_default_writes_mlflow_db_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    completed = mlflow_run_main(tmp_path, *STEPS)
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "mlflow.db").is_file()
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local)
    client = MlflowClient(tracking_uri=local)
    for step in LOG_STEPS:
        (logged,) = runs_of(client, "Default", step)
        assert logged.info.status == "FINISHED"
        _check_chat_model(client, logged)
    (evaluation,) = runs_of(client, "Default", "evaluate")
    _check_evaluation(client, evaluation, {"transformers", "onnx"})
    table = client.download_artifacts(evaluation.info.run_id, "eval_table.json", str(tmp_path))
    assert len(json.loads(Path(table).read_text())["data"]) == 48
    (registration,) = runs_of(client, "Default", "register")
    assert registration.data.tags[REGISTRATION_STATUS_TAG] == "registered"
    champion = client.get_model_version_by_alias("tiny-random-phi3-chat", "champion")
    assert champion.source == evaluation.data.tags["recommended_model_uri"]

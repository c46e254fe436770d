"""`mlflow run . -e main` against a real tracking server: nesting, artifacts, reuse and failures.

The cases share one server and one experiment and build on each other in file order, the way a
user's runs accumulate; each asserts on the runs it added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from llm_packager.reuse import REUSE_KEY_TAG
from llm_packager.step_run import ERROR_TAG

from .support import TrackingServer, mlflow_run_main, runs_of

pytestmark = pytest.mark.slow

EXPERIMENT = "pipeline-spine-test"
TOKEN_CANARY = "hf_canaryTOKEN0123456789"
TINY_FETCH = ("model=tiny-random-phi3", "steps=fetch_model")


@pytest.fixture(scope="module")
def server_env(tracking_server: TrackingServer) -> dict[str, str]:
    # The token canary proves that a token in the environment never reaches params, tags or logs.
    return {
        "MLFLOW_TRACKING_URI": tracking_server.uri,
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
        "HF_TOKEN": TOKEN_CANARY,
    }


@pytest.fixture(scope="module")
def client(tracking_server: TrackingServer) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_server.uri)


def _runs(client: MlflowClient, entry_point: str) -> list:
    return runs_of(client, EXPERIMENT, entry_point)


def _run_ok(tmp_path: Path, server_env: dict[str, str], *parameters: str) -> str:
    completed = mlflow_run_main(tmp_path, *parameters, **server_env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout + completed.stderr


def _steps_record(client: MlflowClient, main_run_id: str) -> dict:
    path = client.download_artifacts(main_run_id, "pipeline_steps.json")
    return json.loads(Path(path).read_text())


def test_cold_run_logs_nested_fetch_run_with_manifest(tmp_path, server_env, client):
    _run_ok(tmp_path, server_env, *TINY_FETCH)

    (main_run,) = _runs(client, "main")
    (fetch_run,) = _runs(client, "fetch_model")
    assert fetch_run.info.status == "FINISHED"
    assert fetch_run.data.tags["mlflow.parentRunId"] == main_run.info.run_id
    assert fetch_run.data.params["source"] == "synthetic"
    assert fetch_run.data.params["num_hidden_layers"] == "2"
    assert fetch_run.data.metrics["model_parameter_count"] > 0
    assert main_run.data.tags["llm_packager.steps_ran"] == "fetch_model"
    assert len(main_run.data.tags["llm_packager.config_hash"]) == 64
    assert (
        "tiny-random-phi3"
        in Path(client.download_artifacts(main_run.info.run_id, "config.yaml")).read_text()
    )

    run_id = fetch_run.info.run_id
    manifest = json.loads(Path(client.download_artifacts(run_id, "manifest.json")).read_text())
    logged = {
        info.path.removeprefix("hf_model/") for info in client.list_artifacts(run_id, "hf_model")
    }
    assert {row["path"] for row in manifest["files"]} == logged
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= logged
    assert json.loads(fetch_run.data.tags["llm_packager.outputs"]) == {
        "model": f"runs:/{run_id}/hf_model",
        "manifest": f"runs:/{run_id}/manifest.json",
    }
    step_log = Path(client.download_artifacts(run_id, "logs/fetch_model.log")).read_text()
    assert "213312 parameters" in step_log
    for run in (main_run, fetch_run):
        recorded = json.dumps([run.data.params, run.data.tags])
        assert TOKEN_CANARY not in recorded
    assert TOKEN_CANARY not in step_log


def test_identical_rerun_reuses_the_fetch_run(tmp_path, server_env, client):
    (previous,) = _runs(client, "fetch_model")
    _run_ok(tmp_path, server_env, *TINY_FETCH)

    assert [run.info.run_id for run in _runs(client, "fetch_model")] == [previous.info.run_id]
    newest_main = _runs(client, "main")[0]
    assert newest_main.data.tags["llm_packager.steps_reused"] == "fetch_model"
    assert _steps_record(client, newest_main.info.run_id) == {
        "fetch_model": {"run_id": previous.info.run_id, "reused": True}
    }


def test_int_parameter_given_as_string_still_reuses(tmp_path, server_env, client):
    before = len(_runs(client, "fetch_model"))
    # The default is 2; typed on the command line it arrives as a string.
    _run_ok(tmp_path, server_env, *TINY_FETCH, "overrides=model.num_hidden_layers=2")
    assert len(_runs(client, "fetch_model")) == before


def test_deleted_announced_artifact_makes_a_new_run(tmp_path, server_env, client, tracking_server):
    (previous,) = _runs(client, "fetch_model")
    artifacts = tracking_server.artifact_root / previous.info.experiment_id / previous.info.run_id
    (artifacts / "artifacts" / "manifest.json").unlink()

    _run_ok(tmp_path, server_env, *TINY_FETCH)

    newest, older = _runs(client, "fetch_model")
    assert older.info.run_id == previous.info.run_id
    assert newest.data.tags[REUSE_KEY_TAG] == previous.data.tags[REUSE_KEY_TAG]


def test_changed_step_parameter_makes_a_new_run(tmp_path, server_env, client):
    before = {run.info.run_id for run in _runs(client, "fetch_model")}
    _run_ok(tmp_path, server_env, *TINY_FETCH, "overrides=model.num_hidden_layers=3")

    new = [run for run in _runs(client, "fetch_model") if run.info.run_id not in before]
    assert len(new) == 1
    assert new[0].data.params["num_hidden_layers"] == "3"


def test_force_reruns_and_the_newest_match_wins(tmp_path, server_env, client):
    _run_ok(tmp_path, server_env, *TINY_FETCH, "force=fetch_model")
    forced = _runs(client, "fetch_model")[0]
    assert forced.data.params["num_hidden_layers"] == "2"
    assert _runs(client, "main")[0].data.tags["llm_packager.steps_ran"] == "fetch_model"

    _run_ok(tmp_path, server_env, *TINY_FETCH)
    newest_main = _runs(client, "main")[0]
    assert _steps_record(client, newest_main.info.run_id)["fetch_model"] == {
        "run_id": forced.info.run_id,
        "reused": True,
    }


def test_bad_override_fails_in_one_line_before_any_step_run(tmp_path, server_env, client):
    fetch_runs_before = len(_runs(client, "fetch_model"))
    completed = mlflow_run_main(
        tmp_path, *TINY_FETCH, "overrides=model.no_such_key=1", **server_env
    )

    assert completed.returncode != 0
    assert "error: Unknown config key 'model.no_such_key'" in completed.stderr
    assert len(_runs(client, "fetch_model")) == fetch_runs_before
    main_run = _runs(client, "main")[0]
    assert main_run.info.status == "FAILED"
    assert "model.no_such_key" in main_run.data.tags[ERROR_TAG]


def test_failed_step_stops_main_and_names_the_step_and_its_run(tmp_path, server_env, client):
    # A Hub that refuses connections at once: the fetch step must fail fast and say what to do.
    completed = mlflow_run_main(
        tmp_path,
        "steps=fetch_model",
        "overrides=model.revision=0123456789abcdef0123456789abcdef01234567",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "hf-home"),
        **server_env,
    )

    assert completed.returncode != 0
    failed = _runs(client, "fetch_model")[0]
    assert failed.info.status == "FAILED"
    assert failed.data.params["source"] == "hub"
    output = completed.stdout + completed.stderr
    assert f"Step 'fetch_model' failed (run {failed.info.run_id})" in output
    reason = failed.data.tags[ERROR_TAG]
    assert reason.startswith("Cannot reach the Hugging Face Hub at http://127.0.0.1:9")
    assert "-P model=tiny-random-phi3" in reason
    assert f"runs:/{failed.info.run_id}/logs/fetch_model.log" in output
    assert _runs(client, "main")[0].info.status == "FAILED"
    shutil.rmtree(tmp_path / "hf-home", ignore_errors=True)

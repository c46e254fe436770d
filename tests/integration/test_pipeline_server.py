"""`mlflow run . -e main` against a real tracking server: nesting, artifacts, reuse and failures.

Every test has an experiment of its own on the shared server and makes the runs it needs, so each
one runs alone (``-k``) as well as with the others.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from llm_packager.keys import (
    CONFIG_ARTIFACT,
    CONFIG_HASH_TAG,
    ERROR_TAG,
    MODEL_PARAMETER_COUNT_METRIC,
    OUTPUTS_TAG,
    PEAK_RSS_CHILDREN_METRIC,
    PEAK_RSS_METRIC,
    PIPELINE_STEPS_ARTIFACT,
    REUSE_KEY_TAG,
    STEPS_RAN_TAG,
    STEPS_REUSED_TAG,
)
from tests.support import TrackingServer, mlflow_run_main, runs_of

pytestmark = pytest.mark.slow

TOKEN_CANARY = "hf_canaryTOKEN0123456789"
TINY_FETCH = ("model=tiny-random-phi3", "steps=fetch_model")
PINNED = "overrides=model.revision=0123456789abcdef0123456789abcdef01234567"


class Pipeline:
    """`mlflow run` calls and run look-ups in one experiment of the shared server."""

    def __init__(self, server: TrackingServer, workdir: Path) -> None:
        self.experiment = f"pipeline-{uuid.uuid4().hex[:8]}"
        self.client = MlflowClient(tracking_uri=server.uri)
        self.server = server
        self.workdir = workdir
        self.env = {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_EXPERIMENT_NAME": self.experiment}

    def run(self, *parameters: str, **environment: str):
        return mlflow_run_main(self.workdir, *parameters, **self.env, **environment)

    def run_ok(self, *parameters: str) -> str:
        completed = self.run(*parameters)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        return completed.stdout + completed.stderr

    def runs(self, entry_point: str) -> list:
        return runs_of(self.client, self.experiment, entry_point)

    def steps_record(self, main_run_id: str) -> dict:
        path = self.client.download_artifacts(main_run_id, PIPELINE_STEPS_ARTIFACT)
        return json.loads(Path(path).read_text())


@pytest.fixture
def pipeline(tracking_server: TrackingServer, tmp_path) -> Pipeline:
    return Pipeline(tracking_server, tmp_path)


def _check_cold_fetch_run(pipeline: Pipeline) -> None:
    """A cold run's nested fetch_model run: its parameters, figures, manifest, outputs and log."""
    (main_run,) = pipeline.runs("main")
    (fetch_run,) = pipeline.runs("fetch_model")
    client = pipeline.client
    assert fetch_run.info.status == "FINISHED"
    assert fetch_run.data.tags[MLFLOW_PARENT_RUN_ID] == main_run.info.run_id
    assert fetch_run.data.params["source"] == "synthetic"
    assert fetch_run.data.params["num_hidden_layers"] == "2"
    assert fetch_run.data.metrics[MODEL_PARAMETER_COUNT_METRIC] > 0
    # What the step needed: at least the interpreter with torch and MLflow imported.
    assert fetch_run.data.metrics[PEAK_RSS_METRIC] > 100
    assert PEAK_RSS_CHILDREN_METRIC in fetch_run.data.metrics
    assert main_run.data.tags[STEPS_RAN_TAG] == "fetch_model"
    assert len(main_run.data.tags[CONFIG_HASH_TAG]) == 64
    config = Path(client.download_artifacts(main_run.info.run_id, CONFIG_ARTIFACT)).read_text()
    assert "tiny-random-phi3" in config

    run_id = fetch_run.info.run_id
    manifest = json.loads(Path(client.download_artifacts(run_id, "manifest.json")).read_text())
    logged = {
        info.path.removeprefix("hf_model/") for info in client.list_artifacts(run_id, "hf_model")
    }
    assert {row["path"] for row in manifest["files"]} == logged
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= logged
    assert json.loads(fetch_run.data.tags[OUTPUTS_TAG]) == {
        "model": f"runs:/{run_id}/hf_model",
        "manifest": f"runs:/{run_id}/manifest.json",
    }
    step_log = Path(client.download_artifacts(run_id, "logs/fetch_model.log")).read_text()
    assert "213312 parameters" in step_log


def test_a_fetch_run_is_reused_until_its_artifact_goes_its_parameter_changes_or_it_is_forced(
    pipeline,
):
    # One experiment, one rerun after another, as a user meets them (each rerun costs a whole
    # `mlflow run`, so the cases share their runs rather than each starting cold).
    pipeline.run_ok(*TINY_FETCH)
    _check_cold_fetch_run(pipeline)
    (cold,) = pipeline.runs("fetch_model")

    # An announced artifact deleted: the run is not reused, and a new one is made for the same key.
    info = cold.info
    artifacts = pipeline.server.artifact_root / info.experiment_id / info.run_id / "artifacts"
    (artifacts / "manifest.json").unlink()
    pipeline.run_ok(*TINY_FETCH)
    remade, older = pipeline.runs("fetch_model")
    assert older.info.run_id == cold.info.run_id
    assert remade.data.tags[REUSE_KEY_TAG] == cold.data.tags[REUSE_KEY_TAG]

    # An identical rerun reuses it, and main's record says so.
    pipeline.run_ok(*TINY_FETCH)
    assert [run.info.run_id for run in pipeline.runs("fetch_model")] == [
        remade.info.run_id, cold.info.run_id
    ]  # fmt: skip
    newest_main = pipeline.runs("main")[0]
    assert newest_main.data.tags[STEPS_REUSED_TAG] == "fetch_model"
    assert pipeline.steps_record(newest_main.info.run_id) == {
        "fetch_model": {"run_id": remade.info.run_id, "reused": True}
    }

    # force reruns it, and the newest of the matching runs is the one reused after.
    pipeline.run_ok(*TINY_FETCH, "force=fetch_model")
    forced = pipeline.runs("fetch_model")[0]
    assert forced.info.run_id != remade.info.run_id
    assert pipeline.runs("main")[0].data.tags[STEPS_RAN_TAG] == "fetch_model"
    pipeline.run_ok(*TINY_FETCH)
    newest_main = pipeline.runs("main")[0]
    assert pipeline.steps_record(newest_main.info.run_id)["fetch_model"] == {
        "run_id": forced.info.run_id,
        "reused": True,
    }

    # A changed parameter makes a new run; the same int written as 03 reuses the run made with 3.
    pipeline.run_ok(*TINY_FETCH, "overrides=model.num_hidden_layers=3")
    three = pipeline.runs("fetch_model")[0]
    assert three.info.run_id != forced.info.run_id
    assert (three.data.params["num_hidden_layers"], forced.data.params["num_hidden_layers"]) == (
        "3", "2"
    )  # fmt: skip
    pipeline.run_ok(*TINY_FETCH, "overrides=model.num_hidden_layers=03")
    assert pipeline.runs("fetch_model")[0].info.run_id == three.info.run_id
    assert pipeline.runs("main")[0].data.tags[STEPS_REUSED_TAG] == "fetch_model"


def test_bad_override_fails_in_one_line_before_any_step_run(pipeline):
    completed = pipeline.run(*TINY_FETCH, "overrides=model.no_such_key=1")

    assert completed.returncode != 0
    assert "error: Unknown config key 'model.no_such_key'" in completed.stderr
    assert pipeline.runs("fetch_model") == []
    (main_run,) = pipeline.runs("main")
    assert main_run.info.status == "FAILED"
    assert "model.no_such_key" in main_run.data.tags[ERROR_TAG]


def test_failed_step_stops_main_and_names_the_step_and_its_run(pipeline, tmp_path):
    # A Hub that refuses connections at once: the fetch step must fail fast and say what to do.
    completed = pipeline.run(
        "steps=fetch_model", PINNED, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "hf-home"),
    )  # fmt: skip

    assert completed.returncode != 0
    (failed,) = pipeline.runs("fetch_model")
    assert failed.info.status == "FAILED"
    assert failed.data.params["source"] == "hub"
    output = completed.stdout + completed.stderr
    assert f"Step 'fetch_model' failed (run {failed.info.run_id})" in output
    reason = failed.data.tags[ERROR_TAG]
    assert reason.startswith("Cannot reach the Hugging Face Hub at http://127.0.0.1:9")
    assert "-P model=tiny-random-phi3" in reason
    assert f"runs:/{failed.info.run_id}/logs/fetch_model.log" in output
    assert pipeline.runs("main")[0].info.status == "FAILED"


def test_main_records_the_steps_that_ran_before_one_failed(pipeline):
    # The model builder refuses an unknown quantisation algorithm: log_onnx fails after
    # fetch_model ran.
    completed = pipeline.run(
        "model=tiny-random-phi3", "steps=fetch_model,log_onnx",
        "overrides=onnx.extra_options.algo_config=no_such_algo",
    )  # fmt: skip
    assert completed.returncode != 0
    (main_run,) = pipeline.runs("main")
    (fetch_run,) = pipeline.runs("fetch_model")
    (failed,) = pipeline.runs("log_onnx")
    assert failed.info.status == "FAILED"
    assert "no_such_algo" in failed.data.tags[ERROR_TAG]
    assert main_run.data.tags[STEPS_RAN_TAG] == "fetch_model"
    assert pipeline.steps_record(main_run.info.run_id) == {
        "fetch_model": {"run_id": fetch_run.info.run_id, "reused": False}
    }


class _RecordingHub(BaseHTTPRequestHandler):
    """A Hub on loopback that answers every request 'repository not found' and records the
    Authorization headers it was sent."""

    authorizations: ClassVar[list[str]] = []

    def _refuse(self) -> None:
        self.authorizations.append(self.headers.get("Authorization", ""))
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _refuse

    def log_message(self, *arguments) -> None:
        return None


def test_a_hugging_face_token_the_hub_path_uses_never_reaches_params_tags_or_logs(
    pipeline, tmp_path
):
    _RecordingHub.authorizations = []
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        completed = pipeline.run(
            "steps=fetch_model", PINNED, HF_ENDPOINT=f"http://127.0.0.1:{hub.server_port}",
            HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN_CANARY,
        )  # fmt: skip
    finally:
        hub.shutdown()
        hub.server_close()
    assert completed.returncode != 0
    # The token really went to the Hub: the path that handles it ran.
    assert f"Bearer {TOKEN_CANARY}" in _RecordingHub.authorizations
    (failed,) = pipeline.runs("fetch_model")
    (main_run,) = pipeline.runs("main")
    step_log = Path(
        pipeline.client.download_artifacts(failed.info.run_id, "logs/fetch_model.log")
    ).read_text()
    assert "404" in step_log or "not found" in step_log.lower()
    for run in (main_run, failed):
        assert TOKEN_CANARY not in json.dumps([run.data.params, run.data.tags])
    assert TOKEN_CANARY not in step_log
    assert TOKEN_CANARY not in completed.stdout + completed.stderr
    shutil.rmtree(tmp_path / "hf-home", ignore_errors=True)


def test_a_machine_too_small_for_a_step_is_told_before_the_step_starts(pipeline):
    completed = pipeline.run("model=tiny-random-phi3", "steps=fetch_model,log_transformers",
                             "overrides=memory.available_mib=1")  # fmt: skip
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "log_transformers would need about " in output
    assert "but 0.0 GiB is available. Cheapest fix: transformers.dtype=bfloat16" in output
    # Refused before it was launched: no log_transformers run was created, and main says why.
    assert pipeline.runs("log_transformers") == []
    main_run = pipeline.runs("main")[0]
    assert main_run.info.status == "FAILED"
    assert main_run.data.tags[ERROR_TAG].startswith("log_transformers would need about ")

    # A user who knows better goes on.
    pipeline.run_ok("model=tiny-random-phi3", "steps=fetch_model,log_transformers",
                    "overrides=memory.available_mib=1 memory.refuse_if_short=false")  # fmt: skip
    (logged,) = pipeline.runs("log_transformers")
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics[PEAK_RSS_METRIC] > 1

"""Azure ML: a tracking server without MLflow 3's LoggedModel API, and the lock azureml-mlflow
admits. The server is a real `mlflow server` behind a loopback proxy that answers 404 to
`/api/2.0/mlflow/logged-models*`, as Azure ML's does."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement

from llm_packager.choices import LoggedModels, ModelStore
from llm_packager.keys import (
    MODEL_ARTIFACT_PATH,
    MODEL_STORE_TAG,
    MODEL_URI_TAG,
    STEPS_REUSED_TAG,
    VALIDATION_STATUS_TAG,
    run_verdict_key,
)
from llm_packager.models.model_store import resolve_model_store
from llm_packager.project import PROJECT_DIR
from tests.loopback_proxy import LOGGED_MODELS_PREFIX, reverse_proxy
from tests.support import (
    TrackingServer,
    mlflow_run_main,
    project_environment,
    runs_of,
    tracking_uri,
)

AZURE_LOCK = PROJECT_DIR / "requirements-azureml.txt"
STEPS = ("model=tiny-random-phi3", "overrides=evaluate.limit=4")


def _lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_auto_finds_logged_models_where_the_server_has_them(local_tracking):
    experiment = local_tracking.create_experiment("probe")
    assert resolve_model_store(LoggedModels.auto, local_tracking, experiment) == (
        ModelStore.logged_models
    )
    assert resolve_model_store(LoggedModels.off, local_tracking, experiment) == (
        ModelStore.run_artifacts
    )


def test_auto_finds_none_behind_a_server_that_answers_404(tracking_server: TrackingServer):
    with reverse_proxy(tracking_server.uri) as (uri, seen):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("probe-404")
        assert resolve_model_store(LoggedModels.auto, client, experiment) == (
            ModelStore.run_artifacts
        )
    assert any(LOGGED_MODELS_PREFIX in line for line in seen)


def test_the_azure_lock_admits_azureml_mlflow_and_pins_everything_it_requires(tmp_path):
    pins = _lock_pins(AZURE_LOCK)
    wanted = f"azureml-mlflow=={pins['azureml-mlflow']}"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp_path), wanted],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("azureml_mlflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("/METADATA")))
    requirements = [
        Requirement(line.split(":", 1)[1].strip())
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    needed = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert any(r.name == "mlflow-skinny" for r in needed)
    for requirement in needed:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement} is not pinned in {AZURE_LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{AZURE_LOCK.name} pins {name}=={pins[name]}, but azureml-mlflow needs {requirement}"
        )
    # The same MLflow runs the whole pipeline: mlflow, skinny and tracing move together.
    assert pins["mlflow"] == pins["mlflow-skinny"] == pins["mlflow-tracing"]


def _check_artifact_mode_pipeline(client: MlflowClient, experiment: str, name: str) -> None:
    (main_run,) = runs_of(client, experiment, "main")
    assert main_run.data.tags[MODEL_STORE_TAG] == "run_artifacts"
    for step in ("log_transformers", "log_onnx"):
        (logged,) = runs_of(client, experiment, step)
        assert logged.data.tags[MODEL_STORE_TAG] == "run_artifacts"
        assert logged.data.tags[MODEL_URI_TAG] == (
            f"runs:/{logged.info.run_id}/{MODEL_ARTIFACT_PATH}"
        )
        assert logged.data.tags[run_verdict_key(VALIDATION_STATUS_TAG)] == "passed"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.status == "READY"
    assert champion.tags[VALIDATION_STATUS_TAG] == "passed"
    assert champion.run_id in {run.info.run_id for run in runs_of(client, experiment, "log_onnx")
                               + runs_of(client, experiment, "log_transformers")}  # fmt: skip


@pytest.mark.slow
def test_the_whole_pipeline_runs_without_the_logged_model_api(tracking_server, tmp_path):
    experiment, name = "no-logged-models", "no-logged-models-chat"
    with reverse_proxy(tracking_server.uri) as (uri, seen):
        env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}
        overrides = f"{STEPS[1]} register.registered_model_name={name}"
        completed = mlflow_run_main(tmp_path, STEPS[0], overrides, **env)
        assert completed.returncode == 0, completed.stderr[-4000:]
        client = MlflowClient(tracking_uri=uri)
        _check_artifact_mode_pipeline(client, experiment, name)
        versions = len(client.search_model_versions(f"name = '{name}'"))

        # A rerun reuses every step, and registers no second version of the same model.
        completed = mlflow_run_main(tmp_path, STEPS[0], overrides, **env)
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert runs_of(client, experiment, "main")[0].data.tags[STEPS_REUSED_TAG] == (
            "fetch_model,log_transformers,log_onnx,evaluate,register"
        )
        assert len(client.search_model_versions(f"name = '{name}'")) == versions

        with tracking_uri(uri):
            answer = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            )
        assert answer[0]["object"] == "chat.completion"
    # The server did refuse the API: the probe asked, and so did MLflow's own downloads of run
    # artifacts (which look for a LoggedModel of the same name and go on without one).
    refused = [line for line in seen if LOGGED_MODELS_PREFIX in line]
    assert refused and all(line.startswith("POST /api/2.0/mlflow/logged-models/search")
                           for line in refused), refused  # fmt: skip


def _azure_venv() -> Path:
    """A virtual environment built from requirements-azureml.txt, kept while the lock is the
    same (the lock's hash names it)."""
    digest = hashlib.sha256(AZURE_LOCK.read_bytes()).hexdigest()[:16]
    venv = Path.home() / ".cache" / "llm_packager" / f"venv-azureml-{digest}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-r", str(AZURE_LOCK)],
            check=True, timeout=1800,
        )  # fmt: skip
        (venv / ".complete").write_text("ok\n")
    return venv


@pytest.mark.slow
def test_the_pipeline_runs_on_the_azure_ml_lock(tracking_server, tmp_path):
    venv = _azure_venv()
    experiment, name = "azure-lock", "azure-lock-chat"
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlflow; print(mlflow.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version == _lock_pins(AZURE_LOCK)["mlflow"]
    with reverse_proxy(tracking_server.uri) as (uri, _):
        environment = project_environment(MLFLOW_TRACKING_URI=uri,
                                          MLFLOW_EXPERIMENT_NAME=experiment)  # fmt: skip
        # The Azure ML environment's interpreter and scripts first, as in the job.
        environment["PATH"] = f"{venv / 'bin'}{os.pathsep}{environment['PATH']}"
        environment.pop("VIRTUAL_ENV", None)
        completed = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "mlflow", "run", str(PROJECT_DIR), "-e", "main",
             "--env-manager", "local", "-P", STEPS[0],
             "-P", f"{STEPS[1]} register.registered_model_name={name}"],
            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-4000:]
        client = MlflowClient(tracking_uri=uri)
        _check_artifact_mode_pipeline(client, experiment, name)
        answered = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import json, sys, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
             "print(json.dumps(m.predict({'messages': [{'role': 'user', 'content': 'hi'}], "
             "'max_tokens': 3})))", f"models:/{name}@champion"],
            env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert answered.returncode == 0, answered.stderr[-3000:]
        assert json.loads(answered.stdout.strip().splitlines()[-1])[0]["object"] == (
            "chat.completion"
        )

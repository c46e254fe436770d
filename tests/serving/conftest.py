"""The tiny model logged by log_onnx at fp32, downloaded once for the serving tests, and a copy
whose build asks for a repetition penalty."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from llm_packager.choices import OnnxPrecision
from llm_packager.config.specs import LogOnnxParameters
from steps.fetch_model import fetch_model
from steps.log_onnx import log_onnx
from tests.serving.serving_support import LONG_TOKENS, REPETITION_PENALTY, genai_config_of
from tests.support import local_fetch_parameters, tracking_uri


@pytest.fixture(scope="session")
def served_fp32(tiny_model_dir, tmp_path_factory) -> Path:
    """The folder of the tiny model as log_onnx logs it (fp32, so both decoders' greedy tokens
    can be compared exactly)."""
    root = tmp_path_factory.mktemp("served-fp32")
    with tracking_uri(f"sqlite:///{root / 'mlflow.db'}"):
        experiment_id = mlflow.MlflowClient().create_experiment(
            "serving-tests", artifact_location=(root / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment_id) as fetch_run:
            fetch_model(local_fetch_parameters(tiny_model_dir), fetch_run.info.run_id)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            result = log_onnx(
                LogOnnxParameters(fetch_model_run_id=fetch_run.info.run_id,
                                  precision=OnnxPrecision.fp32, max_tokens_cap=LONG_TOKENS,
                                  max_new_tokens=16, agreement_tokens=0),
                run.info.run_id,
            )  # fmt: skip
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=result.model_uri, dst_path=str(root / "model")))  # fmt: skip


@pytest.fixture(scope="session")
def penalised_fp32(served_fp32, tmp_path_factory) -> Path:
    """The same model, its build's search section asking for a repetition penalty, as the
    builder writes one from a generation_config.json that has it."""
    copy = Path(shutil.copytree(served_fp32, tmp_path_factory.mktemp("penalised") / "model"))
    config_file = genai_config_of(copy)
    config = json.loads(config_file.read_text())
    config["search"]["repetition_penalty"] = REPETITION_PENALTY
    config_file.write_text(json.dumps(config, indent=4))
    return copy

"""Helpers shared by the tests: the tiny model's sizes, the server handle, `mlflow run` calls."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from llm_packager.choices import ModelSource
from llm_packager.project import PROJECT_DIR
from llm_packager.specs import FetchModelParameters
from llm_packager.synthetic import SyntheticPhi3Spec

# The reference sample's request, unchanged: a prompt already in Phi-3's chat format (the tiny
# model is a Phi-3, so it is served as the sample served Phi-3-mini).
REFERENCE_PROMPT_REQUEST = {
    "prompt": "<|system|>You are a stand-up comedian.<|end|><|user|>Tell me a joke about atom"
    "<|end|><|assistant|>"
}
# The real trained model the tests use, as its conf/ file declares it.
_SMOLLM2 = yaml.safe_load(
    (PROJECT_DIR / "conf" / "model" / "smollm2-135m-instruct.yaml").read_text()
)
SMOLLM2_PACKAGE = _SMOLLM2["gguf_package"]
SMOLLM2_WHEEL_FILE = _SMOLLM2["gguf_file"]
SMOLLM2_GGUF_SHA256 = _SMOLLM2["gguf_sha256"]
# The pipeline's own GGUF cache: the file is verified by its sha256 on every use.
GGUF_CACHE = Path.home() / ".cache" / "llm_packager" / "gguf"

TINY_SPEC = SyntheticPhi3Spec(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    seed=0,
)


def tiny_fetch_parameters() -> FetchModelParameters:
    """fetch_model's parameters for the synthetic tiny Phi-3 of `TINY_SPEC`."""
    return FetchModelParameters(name="tiny", source=ModelSource.synthetic, **vars(TINY_SPEC))


def local_fetch_parameters(folder: Path) -> FetchModelParameters:
    """fetch_model's parameters for a model folder on this machine."""
    return FetchModelParameters(name="tiny", source=ModelSource.local, local_dir=str(folder))


@dataclass(frozen=True)
class TrackingServer:
    """A running `mlflow server` with an SQLite store and artifacts served through it."""

    uri: str
    artifact_root: Path


def project_environment(**extra: str) -> dict[str, str]:
    """The environment for `mlflow run`: this interpreter's scripts first on PATH, so
    `--env-manager local` steps run with the same packages as the tests."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment.pop("MLFLOW_RUN_ID", None)
    environment.update(extra)
    return environment


def mlflow_run_main(
    working_dir: Path, *parameters: str, **environment: str
) -> subprocess.CompletedProcess[str]:
    """Run `mlflow run <project> -e main --env-manager local -P ...` as a user would."""
    command = [sys.executable, "-m", "mlflow", "run", str(PROJECT_DIR), "-e", "main"]
    command += ["--env-manager", "local"]
    for parameter in parameters:
        command += ["-P", parameter]
    return subprocess.run(
        command,
        cwd=working_dir,
        env=project_environment(**environment),
        capture_output=True,
        text=True,
        timeout=600,
    )


def runs_of(client, experiment_name: str, entry_point: str) -> list:
    """Runs of one entry point in an experiment, newest first (none if it does not exist)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        f"tags.`mlflow.project.entryPoint` = '{entry_point}'",
        order_by=["attributes.start_time DESC"],
    )

"""Helpers shared by the tests: the tiny model's sizes, the server handle, `mlflow run` calls."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from llm_packager.choices import ModelSource
from llm_packager.config.specs import FetchModelParameters
from llm_packager.project import PROJECT_DIR
from llm_packager.sources.synthetic import SyntheticPhi3Spec

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


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a fixed loopback port, with an SQLite store and artifacts in ``root``,
    that a test can stop and start again on the same port and store (an outage)."""

    START_SECONDS = 90

    def __init__(self, root: Path, artifact_root: Path | None = None) -> None:
        self.root = root
        self.artifact_root = artifact_root or root / "artifacts"
        self.port = free_loopback_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        # The child keeps its own copy of the file descriptor.
        with (self.root / "server.log").open("a") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.artifact_root),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                # The server's job runner (for GenAI scorers, unused here) starts about seven
                # processes that each import MLflow: seconds of CPU taken from the tests.
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )  # fmt: skip
        deadline = time.monotonic() + self.START_SECONDS
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.root / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def handle(self) -> TrackingServer:
        return TrackingServer(uri=self.uri, artifact_root=self.artifact_root)


def project_environment(**extra: str) -> dict[str, str]:
    """The environment for `mlflow run`: this interpreter's scripts first on PATH, so
    `--env-manager local` steps run with the same packages as the tests."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment.pop("MLFLOW_RUN_ID", None)
    environment.update(extra)
    return environment


def _mlflow_run_main_command(parameters: tuple[str, ...]) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "run", str(PROJECT_DIR), "-e", "main"]
    command += ["--env-manager", "local"]
    for parameter in parameters:
        command += ["-P", parameter]
    return command


def mlflow_run_main(
    working_dir: Path, *parameters: str, **environment: str
) -> subprocess.CompletedProcess[str]:
    """Run `mlflow run <project> -e main --env-manager local -P ...` as a user would."""
    return subprocess.run(
        _mlflow_run_main_command(parameters),
        cwd=working_dir,
        env=project_environment(**environment),
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_mlflow_run_main(
    working_dir: Path, output: Path, *parameters: str, **environment: str
) -> subprocess.Popen:
    """Start `mlflow run ... -e main` in the background, its output going to the file ``output``."""
    with output.open("a") as stream:
        return subprocess.Popen(
            _mlflow_run_main_command(parameters),
            cwd=working_dir,
            env=project_environment(**environment),
            stdout=stream,
            stderr=subprocess.STDOUT,
            text=True,
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

"""Helpers shared by the tests: the tiny model's sizes, the tracking server, the tracking-URI
swap, steps run as processes and `mlflow run` calls."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

from benchmarks.common import LoopbackProcess
from llm_packager.choices import ModelSource
from llm_packager.config.specs import FetchModelParameters
from llm_packager.project import PROJECT_DIR
from llm_packager.serving.decode_loop import usable_cores
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

_TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"

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


def worker_thread_budget(environ: Mapping[str, str]) -> str | None:
    """The OMP_NUM_THREADS an xdist worker sets for itself and every process it starts: its
    share of the cores it may run on (at least 1). None outside a worker (the controller's
    environment is what its workers inherit, so it must not set one) and where the caller set
    one.

    Each worker runs its own pipelines, and torch and onnxruntime in every process they start
    would take every core: two workers' spinning thread pools on 2 cores decode several times
    slower than one thread each (SmolLM2, two processes at once: torch 1.8 tokens/s each with 2
    threads against 10 with 1; onnxruntime int4 25 against 42). torch reads the variable, and
    `usable_cores` passes it on to onnxruntime."""
    if "PYTEST_XDIST_WORKER" not in environ or "OMP_NUM_THREADS" in environ:
        return None
    # No OMP_NUM_THREADS is set here, so the decoders' count is every core this process may use.
    cores = usable_cores()
    return str(max(1, cores // int(environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


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


class MlflowServer(LoopbackProcess):
    """`mlflow server` on a fixed loopback port, with an SQLite store and artifacts in ``root``,
    that a test can stop and start again on the same port and store (an outage). It runs
    ``workers`` server processes, as a team's server would (2 by default). Given an
    ``empty_store`` (the `empty_tracking_store` fixture), its store starts as a copy of it, which
    spares the server MLflow's migrations (about 7 s of a 21 s start on 2 cores)."""

    # What `mlflow server` writes as the Default experiment's artifacts when it serves them.
    DEFAULT_ARTIFACTS = "mlflow-artifacts:/0"

    def __init__(
        self,
        root: Path,
        artifact_root: Path | None = None,
        workers: int = 2,
        empty_store: Path | None = None,
    ) -> None:
        self.root = root
        self.artifact_root = artifact_root or root / "artifacts"
        self._empty_store = empty_store

        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "mlflow", "server",
                    "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                    "--artifacts-destination", str(self.artifact_root),
                    "--host", "127.0.0.1", "--port", str(port),
                    "--workers", str(workers)]  # fmt: skip

        super().__init__(
            command, "/health", log=root / "server.log", cwd=root, start_seconds=90,
            stop_seconds=20,
            # The server's job runner (for GenAI scorers, unused here) starts about seven
            # processes that each import MLflow: seconds of CPU taken from the tests.
            environment={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip

    def start(self) -> MlflowServer:
        if self._empty_store is not None and not (self.root / "mlflow.db").exists():
            copy_tracking_store(self._empty_store, self.root, self.DEFAULT_ARTIFACTS)
        super().start()
        return self

    def handle(self) -> TrackingServer:
        return TrackingServer(uri=self.uri, artifact_root=self.artifact_root)


@contextmanager
def tracking_uri_restored() -> Iterator[None]:
    """On the way out of the block, error or not, put MLflow's tracking URI back exactly as it is
    now: set or unset, and the MLFLOW_TRACKING_URI variable with it.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into the environment (for child
    processes), and `set_tracking_uri(None)` deletes it, so both are saved: a test that set the
    variable with monkeypatch keeps it, and none leaks into the next test. Restoring
    `mlflow.get_tracking_uri()` instead would turn "unset" into the default URI pinned for good,
    and later tests that set the variable would be ignored.
    """
    # MLflow has no public getter for "set or not": get_tracking_uri() falls back to the
    # environment and the default.
    saved_uri = mlflow_tracking_utils._tracking_uri
    saved_environment = os.environ.get(_TRACKING_URI_VARIABLE)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_environment is None:
            os.environ.pop(_TRACKING_URI_VARIABLE, None)
        else:
            os.environ[_TRACKING_URI_VARIABLE] = saved_environment


@contextmanager
def tracking_uri(uri: str) -> Iterator[str]:
    """Make ``uri`` MLflow's tracking URI (and so its registry URI, which follows it) inside the
    block; what was there before comes back on the way out (`tracking_uri_restored`)."""
    with tracking_uri_restored():
        mlflow.set_tracking_uri(uri)
        yield uri


def copy_tracking_store(
    empty_store: Path, folder: Path, default_artifacts: str | None = None
) -> str:
    """A new SQLite tracking store ``folder/mlflow.db``, copied from the empty store
    ``empty_store``; its URI. MLflow writes where the Default experiment keeps its artifacts into
    the store when it makes it: ``default_artifacts``, or else ``folder/mlruns/0``, where a client
    whose working folder is ``folder`` would have put them."""
    store = folder / "mlflow.db"
    shutil.copyfile(empty_store, store)
    with closing(sqlite3.connect(store)) as connection, connection:
        connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (default_artifacts or str(folder / "mlruns" / "0"),),
        )
    return f"sqlite:///{store}"


def step_command(step: str, *arguments: str) -> list[str]:
    """`python -m steps.<step> ARGUMENTS`: an entry point as `mlflow run` starts it."""
    return [sys.executable, "-m", f"steps.{step}", *arguments]


def run_step(
    step: str, *arguments: str, timeout: float = 300, **environment: str
) -> subprocess.CompletedProcess[str]:
    """Run one step's module in a fresh process from the project folder, with the project's
    environment plus ``environment`` (its tracking URI, experiment...); its output captured."""
    return subprocess.run(
        step_command(step, *arguments), cwd=PROJECT_DIR, env=project_environment(**environment),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


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
        # A guard against a hung pipeline, not a speed check: SmolLM2's whole pipeline with the
        # teacher-forced comparison took over 600 s on a loaded 2-core machine.
        timeout=1500,
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

"""Faults a shared team server sees, reproduced for real: the tracking server going away and
coming back, a step killed with SIGKILL while it logs a model, two pipelines at once, and an
artifact store that runs out of space.

Each test starts its own `mlflow server`, which it stops, restarts or starves. The times they
print (``-s``) are the figures the "What happens when…" table of docs/operations.md quotes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from llm_packager.errors import bound_tracking_retries
from llm_packager.keys import (
    ERROR_TAG,
    LOCAL_LOG_TAG,
    MODEL_URI_TAG,
    PID_TAG,
    STEPS_RAN_TAG,
    STEPS_REUSED_TAG,
)
from llm_packager.models.model_store import pending_models
from llm_packager.pipeline.watchdog import HEALTH_POLL_S
from llm_packager.project import PROJECT_DIR
from llm_packager.sources.upstream import fetched_model
from tests.support import (
    MlflowServer,
    project_environment,
    runs_of,
    start_mlflow_run_main,
    step_command,
    tracking_uri,
)

pytestmark = pytest.mark.slow

TINY = "model=tiny-random-phi3"
# The step the outage strikes and the one it needs: log_transformers would add a model upload
# and half a minute of CPU to the test without touching what is tested.
ONNX_STEPS = "steps=fetch_model,log_onnx"
# The outage test's tracking.server_timeout_s, and the slack docs/operations.md states on top of
# it: up to two of main's health checks before it counts the server silent and finds it still
# silent (HEALTH_POLL_S each), and the step's, main's and `mlflow run`'s exits (about 7 s
# measured on 2 busy cores).
OUTAGE_BUDGET_S = 30
OUTAGE_SLACK_S = int(2 * HEALTH_POLL_S) + 10


def _wait_for(
    condition: Callable[[], object],
    what: str,
    timeout: float = 300,
    process: subprocess.Popen | None = None,
    output: Path | None = None,
) -> object:
    """Poll ``condition`` until it gives something true; fail if it times out or ``process``
    (whose output is in the file ``output``) ends first."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        ended = process is not None and process.poll() is not None
        if ended or time.monotonic() > deadline:
            why = f"main ended (exit code {process.returncode})" if ended else f"{timeout:.0f} s"
            shown = output.read_text()[-3000:] if output else ""
            raise AssertionError(f"waiting for {what}: {why}\n{shown}")
        time.sleep(0.2)
    return found


class Experiment:
    """One experiment on a server the test controls, and `mlflow run` processes writing to it."""

    def __init__(self, server: MlflowServer, workdir: Path) -> None:
        self.server = server
        self.name = f"faults-{uuid.uuid4().hex[:8]}"
        self.client = MlflowClient(tracking_uri=server.uri)
        self.workdir = workdir
        self.env = {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_EXPERIMENT_NAME": self.name}
        # A team's experiment exists before its pipelines run. `mlflow run` creates a missing one
        # by looking it up and then inserting it, so two runs started together into a new
        # experiment race inside MLflow's CLI before any step starts (seen in CI as
        # RESOURCE_ALREADY_EXISTS); the README says to create it first.
        self.client.create_experiment(self.name)
        self._started = 0

    def start(self, *parameters: str, environment: dict[str, str] | None = None
              ) -> tuple[subprocess.Popen, Path]:  # fmt: skip
        self._started += 1
        output = self.workdir / f"main-{self._started}.out"
        extra = {**self.env, **(environment or {})}
        return start_mlflow_run_main(self.workdir, output, *parameters, **extra), output

    def finish(self, process: subprocess.Popen, output: Path, *, expect_ok: bool = True) -> str:
        process.wait(timeout=600)
        text = output.read_text()
        assert (process.returncode == 0) == expect_ok, text
        return text

    def runs(self, entry_point: str) -> list:
        return runs_of(self.client, self.name, entry_point)

    def all_runs(self) -> list:
        experiment = self.client.get_experiment_by_name(self.name)
        return self.client.search_runs([experiment.experiment_id], max_results=1000)

    def new_run(self, entry_point: str, known: set[str], started: tuple[subprocess.Popen, Path],
                *, with_pid: bool = False):  # fmt: skip
        """Wait for a run of ``entry_point`` not in ``known`` (tagged with its pid if asked) while
        the main ``started`` runs."""

        def found():
            for run in self.runs(entry_point):
                if run.info.run_id not in known and (not with_pid or PID_TAG in run.data.tags):
                    return run
            return None

        process, output = started
        return _wait_for(found, f"a new {entry_point} run", process=process, output=output)


def _freeze(server: MlflowServer) -> list[psutil.Process]:
    """Stop (SIGSTOP) the `mlflow server` on ``server``'s port and its worker processes: the
    kernel still accepts connections on the port, and nothing answers them. Returns the frozen
    processes, for the caller to kill."""
    port = str(server.port)
    (leader,) = [found for found in psutil.process_iter(["cmdline"])
                 if "server" in (found.info["cmdline"] or [])
                 and port in (found.info["cmdline"] or [])]  # fmt: skip
    frozen = [leader, *leader.children(recursive=True)]
    for process in frozen:
        process.suspend()
    return frozen


@pytest.fixture
def server(tmp_path, empty_tracking_store) -> MlflowServer:
    root = tmp_path / "server"
    root.mkdir()
    handle = MlflowServer(root, empty_store=empty_tracking_store).start()
    yield handle
    handle.stop()


def test_the_tracking_server_going_away_mid_step(tmp_path, server):
    experiment = Experiment(server, tmp_path)

    # A short outage while log_onnx runs: MLflow's retries ride it out.
    process, output = experiment.start(TINY, ONNX_STEPS)
    first_onnx = experiment.new_run("log_onnx", set(), (process, output))
    server.stop()
    stopped = time.monotonic()
    time.sleep(20)
    server.start()
    print(f"\nshort outage: server away {time.monotonic() - stopped:.1f} s")
    experiment.finish(process, output)
    (onnx_run,) = experiment.runs("log_onnx")
    assert onnx_run.info.run_id == first_onnx.info.run_id
    assert onnx_run.info.status == "FINISHED"
    log_path = experiment.client.download_artifacts(onnx_run.info.run_id, "logs/log_onnx.log")
    step_log = Path(log_path).read_text()
    assert "Retrying" in step_log, "the outage did not reach the step: nothing was tested"

    # A server that stays away, as the user meets it: the command they typed, `mlflow run`, with
    # the exports the README prescribes for tracking.server_timeout_s=30. The server is frozen
    # (SIGSTOP) rather than stopped: it still accepts connections and never answers, a hung
    # server or a host gone behind a load balancer, so every attempt waits its whole timeout, the
    # worst case the budget is sized for (a stopped server refuses at once).
    exports = bound_tracking_retries(OUTAGE_BUDGET_S)
    process, output = experiment.start(
        TINY, ONNX_STEPS, "force=log_onnx",
        f"overrides=tracking.server_timeout_s={OUTAGE_BUDGET_S}", environment=exports,
    )  # fmt: skip
    cut_off = experiment.new_run(
        "log_onnx", {first_onnx.info.run_id}, (process, output), with_pid=True
    )
    main_run = experiment.runs("main")[0]
    # Frozen once the step has its model files, while it builds the ONNX model: the step's next
    # call fails as the server being gone. Before that, its download of `runs:/` artifacts
    # cannot: MLflow's RunsArtifactRepository.download_artifacts swallows the connection errors
    # of both its tries (run artifacts, then model artifacts) and raises RESOURCE_DOES_NOT_EXIST,
    # so the step takes the server for reachable and spends two more calls on it.
    _wait_for(lambda: "Building ONNX" in output.read_text(), "log_onnx to build its model",
              process=process, output=output)  # fmt: skip
    frozen = _freeze(server)
    frozen_at = time.time()
    try:
        process.wait(timeout=OUTAGE_BUDGET_S + OUTAGE_SLACK_S + 300)
    finally:
        gave_up = time.time() - frozen_at
        for frozen_process in frozen:
            frozen_process.kill()
        server.stop()
    text = output.read_text()
    print(f"server gone: `mlflow run` exited {gave_up:.1f} s after the server froze")
    assert process.returncode != 0, text
    # Whichever gives up first: the step's own call to the server, or main's watch on the
    # server's /health while the step builds without calling (it stops the step then).
    lost = (f"Step 'log_onnx' (run {cut_off.info.run_id}) lost the tracking server {server.uri}: "
            "no answer after MLflow's retries")  # fmt: skip
    stopped = (f"The tracking server {server.uri} did not answer for {OUTAGE_BUDGET_S // 2} s "
               f"while step 'log_onnx' (run {cut_off.info.run_id}) was working")  # fmt: skip
    assert lost in text or stopped in text, text[-3000:]
    if lost in text:  # the step's call waited, and the step kept its log locally
        kept = re.search(r"log_onnx: the step log is kept at (\S+)", text)
        assert kept, text
        assert "Retrying" in Path(kept.group(1)).read_text()
    # The outer `mlflow run` gave up too, on its own status check of main's run, within the
    # budget's share: with MLflow's defaults it waits about 4 more minutes there.
    assert f"API request to {server.uri}/api/2.0/mlflow/runs/get failed" in text
    # From the moment the server went away, whatever the step was doing.
    assert gave_up <= OUTAGE_BUDGET_S + OUTAGE_SLACK_S, text[-3000:]

    # The server returns: a rerun reuses every finished step and closes the orphaned runs.
    server.start()
    process, output = experiment.start(TINY, ONNX_STEPS)
    experiment.finish(process, output)
    newest_main = experiment.runs("main")[0]
    assert newest_main.data.tags[STEPS_REUSED_TAG] == "fetch_model,log_onnx"
    assert newest_main.data.tags[STEPS_RAN_TAG] == ""
    assert [run.info.run_id for run in experiment.all_runs() if run.info.status == "RUNNING"] == []
    for orphan in (cut_off, main_run):
        closed = experiment.client.get_run(orphan.info.run_id)
        assert closed.info.status == "FAILED"
        assert closed.data.tags[ERROR_TAG].startswith("orphaned: process ")
    assert pending_models(experiment.client, newest_main.info.experiment_id) == []


def test_a_step_killed_while_it_logs_its_model(tmp_path, server):
    experiment = Experiment(server, tmp_path)
    # Wider than the tiny model, so that logging it takes long enough to be caught in the act.
    parameters = (
        TINY, "steps=fetch_model,log_transformers",
        "overrides=model.hidden_size=512 model.intermediate_size=2048 model.num_hidden_layers=8",
    )  # fmt: skip
    process, output = experiment.start(*parameters)
    victim = experiment.new_run("log_transformers", set(), (process, output), with_pid=True)
    experiment_id = victim.info.experiment_id

    def pending_model():
        pending = pending_models(experiment.client, experiment_id)
        return [model for model in pending if model.source_run_id == victim.info.run_id]

    (half_logged,) = _wait_for(pending_model, "log_transformers to start logging its model",
                               process=process, output=output)  # fmt: skip
    os.kill(int(victim.data.tags[PID_TAG]), signal.SIGKILL)
    text = experiment.finish(process, output, expect_ok=False)
    assert f"Step 'log_transformers' failed (run {victim.info.run_id}): its process was killed " \
           "by SIGKILL" in text  # fmt: skip
    killed = experiment.client.get_run(victim.info.run_id)
    assert killed.info.status == "FAILED"
    assert killed.data.tags[ERROR_TAG] == "its process was killed by SIGKILL"

    # What a killed download leaves in the model cache: a staging folder of a process that is
    # gone (a pid that cannot be running: above the kernel's maximum).
    models_cache = Path(os.environ["LLM_PACKAGER_CACHE"]) / "models"
    abandoned = models_cache / ".download-99999999-k1lled"
    (abandoned / "partial").mkdir(parents=True)
    (abandoned / "partial" / "model.safetensors").write_bytes(b"half a file")

    process, output = experiment.start(*parameters)
    experiment.finish(process, output)
    newest, _ = experiment.runs("log_transformers")
    assert newest.info.run_id != victim.info.run_id and newest.info.status == "FINISHED"
    assert experiment.runs("main")[0].data.tags[STEPS_REUSED_TAG] == "fetch_model"
    assert experiment.client.get_logged_model(half_logged.model_id).status == "FAILED"
    assert newest.data.tags[MODEL_URI_TAG] != f"models:/{half_logged.model_id}"
    assert not abandoned.exists()
    assert [entry.name for entry in models_cache.glob(".download-*")] == []


def test_two_pipelines_at_once_with_the_same_inputs(tmp_path, server):
    experiment = Experiment(server, tmp_path)
    name = f"concurrent-{uuid.uuid4().hex[:6]}"
    parameters = (TINY, f"overrides=evaluate.limit=4 register.registered_model_name={name}")
    first, second = experiment.start(*parameters), experiment.start(*parameters)
    for process, output in (first, second):
        experiment.finish(process, output)

    versions = experiment.client.search_model_versions(f"name = '{name}'")
    sources = [version.source for version in versions]
    assert len(sources) == len(set(sources)), sources
    champion = experiment.client.get_model_version_by_alias(name, "champion")
    assert champion.status == "READY"
    assert champion.source in {run.data.tags["recommended_model_uri"]
                               for run in experiment.runs("evaluate")}  # fmt: skip
    cache = Path(os.environ["LLM_PACKAGER_CACHE"]) / "models"
    assert [entry.name for entry in cache.glob(".download-*")] == []
    with tracking_uri(server.uri):
        for fetch_run in experiment.runs("fetch_model"):
            # Verified against its manifest, file by file, from the shared cache.
            assert fetched_model(fetch_run.info.run_id).folder.is_relative_to(cache)

    # Two register steps on one evaluate run, at once: one version per logged model.
    evaluate_run = experiment.runs("evaluate")[0]
    again = f"{name}-again"
    command = step_command("register", "--evaluate-run-id", evaluate_run.info.run_id,
                           "--registered-model-name", again)  # fmt: skip
    environment = project_environment(**experiment.env)
    registers = [subprocess.Popen(command, cwd=PROJECT_DIR, env=environment, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(3)]  # fmt: skip
    for register in registers:
        out, _ = register.communicate(timeout=300)
        assert register.returncode == 0, out
    versions = experiment.client.search_model_versions(f"name = '{again}'")
    sources = [version.source for version in versions]
    assert len(sources) == len(set(sources)) == 2, sources  # champion and challenger
    assert experiment.client.get_model_version_by_alias(again, "champion").status == "READY"


@pytest.fixture
def small_artifact_store(tmp_path):
    """A 64 MiB tmpfs for the server's artifacts, mounted for the test (needs root)."""
    mount_point = tmp_path / "artifacts"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def _fill(filesystem: Path) -> None:
    with (filesystem / "filler").open("wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 2**20)
                filler.flush()
        except OSError:
            pass


def test_a_full_artifact_store_fails_the_step_and_registers_nothing(
    tmp_path, small_artifact_store, empty_tracking_store
):
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(
        root, artifact_root=small_artifact_store, empty_store=empty_tracking_store
    ).start()
    try:
        experiment = Experiment(server, tmp_path)
        name = f"disk-{uuid.uuid4().hex[:6]}"
        parameters = (TINY, f"overrides=evaluate.limit=4 register.registered_model_name={name} "
                            "tracking.server_timeout_s=30")  # fmt: skip
        # The models are logged first, so that the failing run has only log_onnx left to do
        # before the evaluate and register steps it must never reach.
        experiment.finish(*experiment.start(
            *parameters, "steps=fetch_model,log_transformers,log_onnx"))  # fmt: skip
        # The store fills up while log_onnx builds its model, before it uploads it.
        started = experiment.start(*parameters, "force=log_onnx")
        known = {run.info.run_id for run in experiment.runs("log_onnx")}
        failed = experiment.new_run("log_onnx", known, started, with_pid=True)
        _fill(small_artifact_store)
        began = time.monotonic()
        text = experiment.finish(*started, expect_ok=False)
        print(f"\nfull artifact store: main failed {time.monotonic() - began:.1f} s after")
        failed = experiment.client.get_run(failed.info.run_id)
        assert failed.info.status == "FAILED"
        reason = failed.data.tags[ERROR_TAG]
        assert reason.startswith(
            f"The tracking server {server.uri} could not store or serve the artifact "
            f"{failed.info.experiment_id}/{failed.info.run_id}/artifacts/"
        ), reason
        # The server answers 500 to the upload, or now and then resets it before answering.
        told = r": it (answered HTTP 500|closed the connection mid-request) to every retry\. A full"
        assert re.search(told + " or unwritable artifact store", reason), reason
        kept = failed.data.tags[LOCAL_LOG_TAG].split(":", 1)[1]
        assert "could not store or serve the artifact" in Path(kept).read_text()
        assert f"Step 'log_onnx' failed (run {failed.info.run_id}): {reason}. Its log: " in text
        assert f"{kept} (the server did not store it)" in text
        assert experiment.runs("evaluate") == experiment.runs("register") == []
        # main's preflight gets or creates the registered model up front (its write probe); no
        # version may have been registered after the failed step.
        assert experiment.client.search_model_versions(f"name = '{name}'") == []
    finally:
        server.stop()

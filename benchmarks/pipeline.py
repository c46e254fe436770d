"""Wall time of ``main`` on the tiny model, cold and warm, where each step's time goes, and the
bytes one cold run writes to the artifact store.

Each repeat uses a fresh folder and an empty model cache, and either the embedded SQLite store
with local artifacts that a new user gets (``--store embedded``) or a fresh ``mlflow server`` on
loopback with artifacts served through it (``--store server``), or that server with models logged
as run artifacts, as on a server without the LoggedModel API (``--store server-run-artifacts``).
It runs
``mlflow run <project> -e main -P model=tiny-random-phi3`` once (cold: every step runs) and
again (warm: every step is reused). A step's wall time, as main sees it, is split with the
timing tags that ``main`` and ``run_step`` leave on the step's run:

- ``before_process``: MLflow Projects' bookkeeping before the step's process exists (creating the
  run, preparing the environment and the command);
- ``start_up``: the interpreter starting, imports, and resuming the run;
- ``work``: the step's own work;
- ``after_work``: logging the step's log, ending the run, the process exiting and main noticing.

Everything except ``work`` is overhead. Storage: every file under the artifact root after the cold
run, grouped by the run or LoggedModel that wrote it, divided by the fetched model's bytes plus the
ONNX model's bytes.

Usage: ``python -m benchmarks.pipeline [--repeats 3] [--store STORE]`` (a key of ``STORES``)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT

from benchmarks.common import PROJECT_DIR, cell, local_server, summarise
from llm_packager.config.specs import STEP_NAMES
from llm_packager.keys import (
    LAUNCH_TIMING_TAG,
    MODEL_TOTAL_BYTES_METRIC,
    ONNX_SIZE_BYTES_METRIC,
    STEP_TIMING_TAG,
)

STEPS = STEP_NAMES
# Each store: whether it is a fresh `mlflow server` (else the embedded SQLite store), and the
# overrides main runs with. server-run-artifacts logs models as run artifacts, as on a tracking
# server without MLflow 3's LoggedModel API (Azure ML's).
STORES = {
    "embedded": (False, ""),
    "server": (True, ""),
    "server-run-artifacts": (True, "tracking.logged_models=off"),
}
PHASES = ("before_process", "start_up", "work", "after_work")


def tracking_server(folder: Path) -> contextlib.AbstractContextManager[str]:
    """A fresh ``mlflow server`` on a free loopback port (SQLite, artifacts served through it)."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                "--port", str(port), "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]  # fmt: skip

    return local_server(
        command,
        # A fresh server creates its database on the first request (seconds); a user's server has
        # long done that, so it happens here, before anything is timed.
        "/api/2.0/mlflow/experiments/get?experiment_id=0",
        # The job runner (GenAI scorers, unused here) starts about seven processes that import
        # MLflow for the first half minute; on 2 cores they would slow whatever is timed then.
        environment={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_seconds=120,
    )


def run_main(workdir: Path, cache: Path, tracking_uri: str | None, overrides: str) -> float:
    """Run ``main`` on the synthetic Phi-3 (sizes from ``overrides``) in ``workdir``; its wall
    time in seconds."""
    environment = {**os.environ, "LLM_PACKAGER_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    # Unset: the embedded store in workdir, as a new user gets it.
    environment.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        environment["MLFLOW_TRACKING_URI"] = tracking_uri
    environment.pop("MLFLOW_RUN_ID", None)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    command = [sys.executable, "-m", "mlflow", "run", str(PROJECT_DIR), "-e", "main",
               "--env-manager", "local", "-P", "model=tiny-random-phi3",
               "-P", f"overrides={overrides or 'none'}"]  # fmt: skip
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=workdir, env=environment, capture_output=True,
                               text=True)  # fmt: skip
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"mlflow run failed:\n{completed.stderr[-3000:]}")
    return wall


def _step_phases(run) -> dict[str, float]:
    launch = json.loads(run.data.tags[LAUNCH_TIMING_TAG])
    step = json.loads(run.data.tags[STEP_TIMING_TAG])
    wall = launch["returned"] - launch["launched"]
    work = step["work_finished"] - step["work_started"]
    return {
        "before_process": step["process_started"] - launch["launched"],
        "start_up": step["work_started"] - step["process_started"],
        "work": work,
        "after_work": launch["returned"] - step["work_finished"],
        "wall": wall,
        "overhead": wall - work,
    }


def _storage(client, experiment, artifact_root: Path) -> dict[str, object]:
    """Bytes under the artifact root, by the step and the artifact or model that wrote them."""
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    models = {model.model_id: model for model in client.search_logged_models(
        experiment_ids=[experiment.experiment_id])}  # fmt: skip
    by_source: dict[str, int] = defaultdict(int)
    for path in artifact_root.rglob("*"):
        if not path.is_file():
            continue
        parts = path.relative_to(artifact_root).parts
        if "models" in parts and (index := parts.index("models")) + 1 < len(parts) \
                and parts[index + 1] in models:  # fmt: skip
            model = models[parts[index + 1]]
            step = runs[model.source_run_id].data.tags[MLFLOW_PROJECT_ENTRY_POINT]
            by_source[f"{step}: LoggedModel '{model.name}'"] += path.stat().st_size
            continue
        run_ids = [part for part in parts if part in runs]
        if run_ids:
            run = runs[run_ids[0]]
            step = run.data.tags.get(MLFLOW_PROJECT_ENTRY_POINT, "?")
            below = parts[parts.index(run_ids[0]) + 1 :]
            name = below[1] if len(below) > 1 and below[0] == "artifacts" else "/".join(below)
            by_source[f"{step}: {name}"] += path.stat().st_size
        else:
            by_source[f"other: {'/'.join(parts[:3])}"] += path.stat().st_size
    fetch = next(r for r in runs.values() if r.data.tags.get(MLFLOW_PROJECT_ENTRY_POINT)
                 == "fetch_model")  # fmt: skip
    onnx = next(r for r in runs.values() if r.data.tags.get(MLFLOW_PROJECT_ENTRY_POINT)
                == "log_onnx")  # fmt: skip
    fetched_bytes = int(fetch.data.metrics[MODEL_TOTAL_BYTES_METRIC])
    onnx_bytes = int(onnx.data.metrics[ONNX_SIZE_BYTES_METRIC])
    total = sum(by_source.values())
    return {
        "total_bytes": total,
        "fetched_model_bytes": fetched_bytes,
        "onnx_model_bytes": onnx_bytes,
        "ratio": total / (fetched_bytes + onnx_bytes),
        "by_source": dict(sorted(by_source.items(), key=lambda item: -item[1])),
    }


def _one_repeat(scratch: Path, store: str) -> dict[str, object]:
    workdir, cache = scratch / "work", scratch / "cache"
    workdir.mkdir()
    server, overrides = STORES[store]
    with contextlib.ExitStack() as stack:
        tracking_uri = stack.enter_context(tracking_server(scratch)) if server else None
        cold = run_main(workdir, cache, tracking_uri, overrides)
        warm = run_main(workdir, cache, tracking_uri, overrides)
        return _account(scratch, workdir, tracking_uri, cold, warm)


def _account(
    scratch: Path, workdir: Path, tracking_uri: str | None, cold: float, warm: float
) -> dict[str, object]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment("0")
    mains = client.search_runs(
        [experiment.experiment_id], f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = 'main'",
        order_by=["attributes.start_time ASC"],
    )  # fmt: skip
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{mains[0].info.run_id}'"
    )
    phases = {run.data.tags[MLFLOW_PROJECT_ENTRY_POINT]: _step_phases(run) for run in children}
    if set(phases) != set(STEPS) or client.search_runs(
        [experiment.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{mains[1].info.run_id}'"
    ):
        raise RuntimeError("the cold run must run every step and the warm run must reuse them all")
    if tracking_uri:
        artifact_root = scratch / "artifacts"
    else:
        artifact_root = Path(experiment.artifact_location.removeprefix("file://"))
        if not artifact_root.is_absolute():
            artifact_root = workdir / artifact_root
    return {
        "cold_s": cold,
        "warm_s": warm,
        "main_own_s": cold - sum(step["wall"] for step in phases.values()),
        "steps": phases,
        "storage": _storage(client, experiment, artifact_root),
    }


def measure(repeats: int, store: str = "embedded") -> dict[str, object]:
    """Cold and warm wall times, per-step phases (median, min, max) and the storage account."""
    samples = []
    for index in range(repeats):
        print(
            f"pipeline ({store} store): cold + warm run {index + 1}/{repeats} ...", file=sys.stderr
        )
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as scratch:
            samples.append(_one_repeat(Path(scratch), store))
    steps = {
        step: {
            phase: summarise([sample["steps"][step][phase] for sample in samples])
            for phase in (*PHASES, "wall", "overhead")
        }
        for step in STEPS
    }
    cold = summarise([sample["cold_s"] for sample in samples])
    warm = summarise([sample["warm_s"] for sample in samples])
    return {
        "store": store,
        "cold_s": cold,
        "warm_s": warm,
        "warm_fraction": summarise([s["warm_s"] / s["cold_s"] for s in samples]),
        "main_own_s": summarise([sample["main_own_s"] for sample in samples]),
        "steps": steps,
        "storage": samples[-1]["storage"],
        "storage_ratio": summarise([sample["storage"]["ratio"] for sample in samples]),
    }


def markdown(figures: dict[str, object]) -> str:
    """The pipeline and storage tables."""
    lines = [
        f"Tracking store: {figures['store']}. "
        f"Cold `main`: {cell(figures['cold_s'], 1)} s; warm rerun (all reused): "
        f"{cell(figures['warm_s'], 1)} s = {figures['warm_fraction']['median']:.1%} of cold. "
        f"Main's own time outside steps (cold): {cell(figures['main_own_s'], 1)} s.",
        "",
        "| step (cold) | wall (s) | before process (s) | start-up (s) | work (s) | after work (s) "
        "| overhead (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for step, phases in figures["steps"].items():
        lines.append(
            f"| {step} | {cell(phases['wall'], 1)} | {cell(phases['before_process'], 1)} | "
            f"{cell(phases['start_up'], 1)} | {cell(phases['work'], 1)} | "
            f"{cell(phases['after_work'], 1)} | {cell(phases['overhead'], 1)} |"
        )
    storage = figures["storage"]
    lines += [
        "",
        f"Artifact bytes of one cold run: {storage['total_bytes']:,} = "
        f"{figures['storage_ratio']['median']:.2f} x (fetched model "
        f"{storage['fetched_model_bytes']:,} + ONNX model {storage['onnx_model_bytes']:,} bytes).",
        "",
        "| written by | bytes |",
        "|---|---|",
    ]
    lines += [f"| {source} | {size:,} |" for source, size in storage["by_source"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", choices=tuple(STORES), default="embedded")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    arguments = parser.parse_args()
    figures = measure(arguments.repeats, arguments.store)
    print(markdown(figures))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Peak memory of every step at Phi-3-mini's real width, and the per-layer slope to 32 layers.

The synthetic Phi-3 gets Phi-3-mini's real dimensions (vocabulary 32064, hidden 3072,
intermediate 8192, 32 heads) and 1, 2 and 4 layers, on random weights. ``main`` runs the whole
pipeline on each (the embedded store, a fresh folder and model cache, a short evaluation), and
every step run's own metrics say what it needed: ``peak_rss_mib`` (the step's process, VmHWM) and
``peak_rss_children_mib`` (the largest child it waited for: the ONNX model builder in log_onnx,
a candidate's worker in evaluate). A least-squares line through the layer counts gives each
figure's per-layer slope, extrapolated to Phi-3-mini's 32 layers. Disk: the fetched model's and
the ONNX model's bytes, the same way.

Random weights change nothing here: memory follows the tensors' shapes, not their values.

Each figure's fit is also given per parameter, the form ``llm_packager.pipeline.memory_budget``
uses to
estimate any model's need: a fixed part plus a number of copies of the float32 weights
(the slope over the weights' float32 size per layer).

Usage: ``python -m benchmarks.memory [--layers 1 2 4] [--weights-dtype float32|bfloat16]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT

from benchmarks.common import local_server, machine_description
from benchmarks.pipeline import run_main
from llm_packager.config.specs import STEP_NAMES
from llm_packager.keys import (
    MODEL_TOTAL_BYTES_METRIC,
    MODEL_URI_TAG,
    ONNX_SIZE_BYTES_METRIC,
    PEAK_RSS_CHILDREN_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
    PEAK_RSS_METRIC,
    candidate_key,
)

PHI3_MINI_LAYERS = 32
PHI3_MINI_WIDTH = (
    "model.vocab_size=32064 model.hidden_size=3072 model.intermediate_size=8192 "
    "model.num_attention_heads=32 model.num_key_value_heads=32 model.max_position_embeddings=4096"
)
# Two prompts, eight tokens: enough for each candidate's worker to load and generate.
SHORT_EVALUATION = "evaluate.limit=2 evaluate.max_tokens=8 evaluate.ttft_requests=1"
# Phi-3-mini's parameters: the embeddings and the LM head, and each decoder layer.
PHI3_MINI_EMBEDDING_PARAMETERS = 197_004_288
PHI3_MINI_LAYER_PARAMETERS = 113_252_352
RESULTS = Path(__file__).parent / "results"


def _peak_of_tree(pid: int) -> float:
    """The largest VmHWM (MiB) of a process and its descendants."""
    import psutil

    root = psutil.Process(pid)
    peaks = []
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(OSError, psutil.Error):
            status = Path(f"/proc/{process.pid}/status").read_text()
            peaks += [int(line.split()[1]) / 1024 for line in status.splitlines()
                      if line.startswith("VmHWM:")]  # fmt: skip
    return max(peaks)


def _serving_peak_mib(model_uri: str, tracking_uri: str) -> float:
    """Peak memory of `mlflow models serve` of ``model_uri`` after it answered one chat request
    (the server process and its workers)."""
    import psutil

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    environment = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip

    with local_server(command, "/ping", environment=environment, start_seconds=300) as uri:
        body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}],
                           "max_tokens": 8}).encode()  # fmt: skip
        request = urllib.request.Request(f"{uri}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
        port = int(uri.rsplit(":", 1)[1])
        listening = next(
            connection.pid
            for connection in psutil.net_connections("tcp")
            if connection.laddr.port == port and connection.status == "LISTEN"
        )
        # `mlflow models serve` starts uvicorn, which loads the model: measure from the top.
        server = psutil.Process(listening)
        while server.parent() and "mlflow" in " ".join(server.parent().cmdline()):
            server = server.parent()
        return _peak_of_tree(server.pid)


def _figures(tracking_uri: str) -> dict[str, float]:
    """Each step run's peak memory (MiB) and the model bytes on disk, from its run's metrics."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("Default")
    figures: dict[str, float] = {}
    for run in client.search_runs([experiment.experiment_id]):
        step = run.data.tags.get(MLFLOW_PROJECT_ENTRY_POINT)
        if step not in STEP_NAMES or step == "main":
            continue
        metrics = run.data.metrics
        figures[f"{step} (own process)"] = metrics[PEAK_RSS_METRIC]
        if metrics.get(PEAK_RSS_CHILDREN_METRIC, 0) > 0:
            child = {"log_onnx": "model builder", "evaluate": "largest candidate worker"}.get(
                step, "child"
            )
            figures[f"{step} ({child})"] = metrics[PEAK_RSS_CHILDREN_METRIC]
        if step == "evaluate":
            for candidate in ("transformers", "onnx"):
                figures[f"evaluate ({candidate} worker)"] = metrics[
                    candidate_key(candidate, PEAK_RSS_GENERATE_MIB_METRIC)
                ]
        if step in ("log_transformers", "log_onnx"):
            figures[f"mlflow models serve ({step[4:]})"] = _serving_peak_mib(
                run.data.tags[MODEL_URI_TAG], tracking_uri
            )
        if step == "fetch_model":
            figures["disk: fetched model (MiB)"] = metrics[MODEL_TOTAL_BYTES_METRIC] / 2**20
        if step == "log_onnx":
            figures["disk: ONNX model (MiB)"] = metrics[ONNX_SIZE_BYTES_METRIC] / 2**20
    return figures


def _fit(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares slope and intercept of value against layers."""
    layers = list(points)
    mean_x = sum(layers) / len(layers)
    mean_y = sum(points.values()) / len(points)
    spread = sum((x - mean_x) ** 2 for x in layers)
    slope = sum((x - mean_x) * (points[x] - mean_y) for x in layers) / spread
    return slope, mean_y - slope * mean_x


def measure(layer_counts: list[int], weights_dtype: str) -> dict[str, object]:
    """Run the pipeline once per layer count; each figure's points, slope and 32-layer value."""
    by_layers: dict[int, dict[str, float]] = {}
    for layers in layer_counts:
        print(f"memory: pipeline at Phi-3-mini width, {layers} layer(s) ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="memory-benchmark-") as scratch:
            workdir = Path(scratch)
            overrides = (f"{PHI3_MINI_WIDTH} model.num_hidden_layers={layers} "
                         f"model.weights_dtype={weights_dtype} {SHORT_EVALUATION}")  # fmt: skip
            wall = run_main(workdir, workdir / "cache", None, overrides)
            by_layers[layers] = _figures(f"sqlite:///{workdir / 'mlflow.db'}")
            print(f"  done in {wall:.0f} s", file=sys.stderr)
    fits = {}
    for name in by_layers[layer_counts[0]]:
        points = {layers: figures[name] for layers, figures in by_layers.items()}
        slope, intercept = _fit(points)
        copies = slope * 2**20 / (PHI3_MINI_LAYER_PARAMETERS * 4)
        fits[name] = {
            "points": points,
            "per_layer": slope,
            "intercept": intercept,
            "at_32_layers": intercept + slope * PHI3_MINI_LAYERS,
            "float32_copies": copies,
            "fixed_mib": intercept - copies * PHI3_MINI_EMBEDDING_PARAMETERS * 4 / 2**20,
        }
    return {"machine": machine_description(), "layers": layer_counts,
            "weights_dtype": weights_dtype, "figures": fits}  # fmt: skip


def table(results: dict[str, object]) -> str:
    """The figures as a Markdown table (MiB)."""
    layers = results["layers"]
    header = " | ".join(f"{count} layer(s)" for count in layers)
    lines = [f"| figure (MiB) | {header} | per layer | extrapolated to 32 layers "
             "| fixed | float32 copies |", "|---" * (len(layers) + 5) + "|"]  # fmt: skip
    for name, fit in results["figures"].items():
        points = " | ".join(f"{fit['points'][count]:,.0f}" for count in layers)
        lines.append(f"| {name} | {points} | {fit['per_layer']:,.0f} | "
                     f"{fit['at_32_layers']:,.0f} | {fit['fixed_mib']:,.0f} | "
                     f"{fit['float32_copies']:.2f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16"])
    arguments = parser.parse_args()
    if len(set(arguments.layers)) < 2:
        parser.error("--layers needs at least two layer counts to fit a slope")
    figures = measure(arguments.layers, arguments.weights_dtype)
    output = RESULTS / f"memory-{arguments.weights_dtype}.json"
    output.write_text(json.dumps(figures, indent=2, default=str))
    print(table(figures))

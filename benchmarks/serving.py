"""The ONNX pyfunc served on loopback: throughput, latency and time to first token with 1, 4, 8 and
16 concurrent clients, answered whole and streamed.

The served model is the benchmark proxy of ``benchmarks.model_speed`` (int4, ~170 M parameters,
random weights) saved as our pyfunc. Each client sends its share of a bounded number of chat
requests one after another (``--requests-per-client``), so every level stops by itself; each level
is measured ``--repeats`` times and figures are the median with min and max.

- **whole answers** go through ``mlflow models serve`` with one worker (MLflow's default), which
  calls ``predict`` from a thread pool; a client sees its first token with the whole answer.
- **streamed answers** go through ``predict_stream`` of the same model loaded in this process,
  one thread per client: MLflow's local scoring server does not stream, so this is where streaming
  can be measured on a laptop. Time to first token is when the first content arrives.

``--batching auto`` (the default) or ``--batching generators`` writes the model's ``batching``
setting (``onnx.batching``): ``auto`` is the shared-rows decoder on CPU builds, one batch that
requests join and leave at every step; ``generators`` is onnxruntime-genai Generators, a batch per
group of arrivals. The pyfunc is saved afresh for every run, so each run serves its own setting.

``--ceiling benchmarks/results/batch-steps.json`` (the output of ``benchmarks.batch_steps`` for
the same builds) adds to the table how close 8 whole-answer clients come to the in-process
ceiling: their tokens/s against 8 sequences per decode step of the same build and decoder, and
their 8-against-1 speed-up against that of the decode steps.

``--model-code`` and ``--serving-code`` serve another version of the model's file and of its
serving package, which is how the figures before a change are taken (``git worktree add before
<commit>``, then ``--model-code before/llm_packager/models/onnx_chat_model.py --serving-code
before/llm_packager/serving``; a model file from before the package was split out holds all its
code and needs only ``--model-code``); a version without ``predict_stream`` is measured whole
only.

``--max-tokens 8,64`` mixes short and long answers (each client asks for them in turn), the load
where a batch that requests join and leave at every step matters most.

Usage: ``python -m benchmarks.serving [--batching auto|generators] [--requests-per-client 4]
[--max-tokens 32] [--repeats 3] [--ceiling BATCH_STEPS_JSON]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import cell, local_server, summarise
from benchmarks.model_speed import (
    BATCH_PROMPTS,
    BUILDS,
    DEFAULT_WORKDIR,
    prepare_proxy,
)
from llm_packager.models.served_code import MODEL_CODE, SERVING_SOURCE
from llm_packager.serving.keys import BATCH_WAIT_MS_KEY, BATCHING_KEY

CONCURRENCY = (1, 4, 8, 16)
BATCHINGS = ("auto", "generators")
# The decoder of benchmarks.batch_steps that each batching setting serves on a CPU build.
CEILING_DECODER = {"auto": "shared rows", "generators": "generators"}


def served_model(model_dir: Path) -> contextlib.AbstractContextManager[str]:
    """``mlflow models serve`` of a local model folder on a free loopback port."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
                "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip

    # `--env-manager local` serves with the interpreter running this benchmark.
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))
    return local_server(
        command, "/ping", environment={**os.environ, "PATH": path}, start_seconds=180
    )


def _chat(prompt: str, max_tokens: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}


def _whole(uri: str) -> Callable[[str, int], tuple[float, float, int]]:
    """A client of the scoring server: (time to first token, latency, tokens) per request."""

    def send(prompt: str, max_tokens: int) -> tuple[float, float, int]:
        request = urllib.request.Request(
            f"{uri}/invocations", data=json.dumps(_chat(prompt, max_tokens)).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
        latency = time.perf_counter() - started
        predictions = answer["predictions"] if isinstance(answer, dict) else answer
        return latency, latency, predictions[0]["usage"]["completion_tokens"]

    return send


def _streamed(model) -> Callable[[str, int], tuple[float, float, int]]:
    """A streaming client of the model loaded in this process."""

    def send(prompt: str, max_tokens: int) -> tuple[float, float, int]:
        started = time.perf_counter()
        first = None
        for chunk in model.predict_stream(_chat(prompt, max_tokens)):
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            usage = chunk.get("usage")
        latency = time.perf_counter() - started
        return (first if first is not None else latency), latency, usage["completion_tokens"]

    return send


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(share * len(ordered)) - 1)]


def _one_level(
    send: Callable, clients: int, per_client: int, max_tokens: tuple[int, ...]
) -> dict[str, float]:
    def client(index: int) -> list[tuple[float, float, int]]:
        return [
            send(BATCH_PROMPTS[(index + turn) % len(BATCH_PROMPTS)],
                 max_tokens[(index + turn) % len(max_tokens)])
            for turn in range(per_client)
        ]  # fmt: skip

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [row for rows in pool.map(client, range(clients)) for row in rows]
    wall = time.perf_counter() - started
    first_tokens = [first for first, _, _ in results]
    latencies = [latency for _, latency, _ in results]
    return {
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(tokens for *_, tokens in results) / wall,
        "p50_latency_s": _percentile(latencies, 0.5),
        "p95_latency_s": _percentile(latencies, 0.95),
        "p50_first_token_s": _percentile(first_tokens, 0.5),
        "p95_first_token_s": _percentile(first_tokens, 0.95),
    }


def _one_request(model, max_tokens: tuple[int, ...], repeats: int) -> dict[str, dict]:
    """The same prompts sent as the rows of one ``predict`` call, in process: every sequence is
    known at once and decoded in one batch, with no server and no arrival spread, so no number of
    clients can get more tokens/s than this from the same machine."""
    levels = {}
    for rows in CONCURRENCY:
        print(f"serving (one request): {rows} rows ...", file=sys.stderr)
        request = [
            _chat(BATCH_PROMPTS[row % len(BATCH_PROMPTS)], max_tokens[row % len(max_tokens)])
            for row in range(rows)
        ]
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            answers = model.predict(request)
            wall = time.perf_counter() - started
            samples.append(sum(answer["usage"]["completion_tokens"] for answer in answers) / wall)
        levels[str(rows)] = {"tokens_per_s": summarise(samples)}
    return levels


def _levels(
    send: Callable, mode: str, per_client: int, max_tokens: tuple[int, ...], repeats: int
) -> dict:
    send(BATCH_PROMPTS[0], max_tokens[0])  # warm-up
    levels = {}
    for clients in CONCURRENCY:
        print(f"serving ({mode}): {clients} concurrent clients ...", file=sys.stderr)
        samples = [_one_level(send, clients, per_client, max_tokens) for _ in range(repeats)]
        levels[str(clients)] = {
            key: summarise([sample[key] for sample in samples]) for key in samples[0]
        }
    return levels


def measure(
    requests_per_client: int,
    max_tokens: tuple[int, ...],
    repeats: int,
    workdir: Path = DEFAULT_WORKDIR,
    model_code: Path = MODEL_CODE,
    batch_wait_ms: int | None = None,
    build: str = "onnx-int4",
    serving_code: Path = SERVING_SOURCE,
    batching: str = "auto",
) -> dict[str, object]:
    """Each concurrency level's figures (median, min, max over ``repeats``), whole and streamed."""
    import mlflow

    config = {BATCHING_KEY: batching}
    if batch_wait_ms is not None:
        config[BATCH_WAIT_MS_KEY] = batch_wait_ms
    _, _, pyfunc_dir = prepare_proxy(workdir, model_code, config, build, serving_code)
    modes = {}
    with served_model(pyfunc_dir) as uri:
        modes["whole"] = _levels(_whole(uri), "whole", requests_per_client, max_tokens, repeats)
    model = mlflow.pyfunc.load_model(str(pyfunc_dir))
    # MLflow marks a model that defines predict_stream as streamable when it is saved.
    if model.metadata.flavors["python_function"].get("streamable"):
        send = _streamed(model)
        modes["streamed"] = _levels(send, "streamed", requests_per_client, max_tokens, repeats)
    one_request = _one_request(model, max_tokens, repeats)
    return {
        "model_code": str(model_code),
        "serving_code": str(serving_code),
        "build": build,
        "batching": batching,
        "batch_wait_ms": batch_wait_ms,
        "requests_per_client": requests_per_client,
        "max_tokens": list(max_tokens),
        "repeats": repeats,
        "modes": modes,
        "one_request": one_request,
    }


def _tokens_asked(max_tokens: int | list[int]) -> str:
    if isinstance(max_tokens, int) or len(max_tokens) == 1:
        return str(max_tokens if isinstance(max_tokens, int) else max_tokens[0])
    return " or ".join(map(str, max_tokens)) + " (in turn)"


def markdown(figures: dict[str, object], ceiling: dict[str, dict] | None = None) -> str:
    """The serving table: one row per mode and number of clients; with ``ceiling`` (the figures of
    ``benchmarks.batch_steps``), the share of it that 8 whole-answer clients get."""
    batching = f", batching {figures['batching']}" if figures.get("batching") else ""
    lines = [
        f"Int4 proxy pyfunc ({figures.get('build', 'onnx-int4')}{batching}), "
        f"{_tokens_asked(figures['max_tokens'])} new tokens per request, "
        f"{figures['requests_per_client']} requests per client, median (min-max) of "
        f"{figures['repeats']}. Whole: `mlflow models serve`, 1 worker. Streamed: "
        "`predict_stream` in process (the local scoring server does not stream).",
        "",
        "| answers | clients | requests/s | generated tokens/s | p50 latency (s) "
        "| p95 latency (s) | p50 first token (s) | p95 first token (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, levels in figures["modes"].items():
        for clients, row in levels.items():
            lines.append(
                f"| {mode} | {clients} | {cell(row['requests_per_s'], 2)} "
                f"| {cell(row['tokens_per_s'], 1)} | {cell(row['p50_latency_s'], 3)} "
                f"| {cell(row['p95_latency_s'], 3)} | {cell(row['p50_first_token_s'], 3)} "
                f"| {cell(row['p95_first_token_s'], 3)} |"
            )
    one_request = figures.get("one_request")
    if one_request:
        lines += [
            "",
            "The same prompts as rows of one request, in process (the most this machine gives):",
            "",
            "| rows in one request | generated tokens/s |",
            "|---|---|",
        ]
        lines += [
            f"| {rows} | {cell(row['tokens_per_s'], 1)} |" for rows, row in one_request.items()
        ]
    ratios = [
        f"{name} {_speed_up(levels)}"
        for name, levels in (*figures["modes"].items(), ("one request", one_request or {}))
        if "1" in levels and "8" in levels
    ]
    lines += ["", f"Generated tokens/s, 8 against 1: {', '.join(ratios)}."]
    if ceiling and "whole" in figures["modes"]:
        lines += ["", _against_ceiling(figures, ceiling)]
    return "\n".join(lines)


def _against_ceiling(figures: dict[str, object], ceiling: dict[str, dict]) -> str:
    """8 whole-answer clients against 8 sequences per decode step of the same build and decoder:
    their tokens/s, and their speed-up over 1 client against the steps' speed-up over 1."""
    build = figures.get("build", "onnx-int4")
    decoder = CEILING_DECODER[figures.get("batching") or "auto"]
    steps = {n: ceiling[build][decoder][n]["tokens_per_s"]["median"] for n in ("1", "8")}
    whole = {n: figures["modes"]["whole"][n]["tokens_per_s"]["median"] for n in ("1", "8")}
    share = whole["8"] / steps["8"]
    speed_ups = (whole["8"] / whole["1"]) / (steps["8"] / steps["1"])
    return (
        f"Against the ceiling ({build}, {decoder}, `benchmarks.batch_steps`): 8 clients whole "
        f"{whole['8']:.1f} / {steps['8']:.1f} tokens/s = {share:.2f}; speed-up 8 against 1 "
        f"{whole['8'] / whole['1']:.2f}x / {steps['8'] / steps['1']:.2f}x = {speed_ups:.2f}."
    )


def _speed_up(levels: dict[str, dict]) -> str:
    """How many times one client's (or row's) tokens/s eight of them get, from the medians."""
    eight, one = (levels[key]["tokens_per_s"]["median"] for key in ("8", "1"))
    return f"{eight / one:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument(
        "--max-tokens",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=(32,),
        help="new tokens per request; a list (8,64) makes each client ask for them in turn",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="built models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--model-code", type=Path, default=MODEL_CODE, help="the model file to serve"
    )
    parser.add_argument(
        "--serving-code", type=Path, default=SERVING_SOURCE,
        help="the serving package logged with it (a folder like llm_packager/serving)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-wait-ms", type=int, default=None, help="the model's batch_wait_ms (its default)"
    )
    parser.add_argument(
        "--build", choices=sorted(BUILDS), default="onnx-int4", help="which int4 build to serve"
    )
    parser.add_argument(
        "--batching", choices=BATCHINGS, default="auto",
        help="the model's batching: auto (shared rows on CPU) or onnxruntime-genai Generators",
    )  # fmt: skip
    parser.add_argument(
        "--ceiling", type=Path, default=None,
        help="a benchmarks.batch_steps JSON: also print the share of it that 8 clients get",
    )  # fmt: skip
    arguments = parser.parse_args()
    figures = measure(
        arguments.requests_per_client, arguments.max_tokens, arguments.repeats, arguments.workdir,
        arguments.model_code, arguments.batch_wait_ms, arguments.build, arguments.serving_code,
        arguments.batching,
    )  # fmt: skip
    ceiling = json.loads(arguments.ceiling.read_text()) if arguments.ceiling else None
    print(markdown(figures, ceiling))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

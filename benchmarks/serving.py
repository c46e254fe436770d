"""The ONNX pyfunc under ``mlflow models serve`` on loopback: requests/s, generated tokens/s and
latency percentiles with 1, 4 and 8 concurrent clients.

The served model is the benchmark proxy of ``benchmarks.model_speed`` (int4, ~170 M parameters,
random weights) logged as our pyfunc. Each client sends its share of a bounded number of chat
requests one after another (``--requests-per-client``), so every level stops by itself. Each
level is measured ``--repeats`` times; figures are the median with min and max. The server runs
one worker (MLflow's default), which answers concurrent requests on threads.

Usage: ``python -m benchmarks.serving [--requests-per-client 4] [--max-tokens 32] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import cell, local_server, summarise
from benchmarks.model_speed import BATCH_PROMPTS, DEFAULT_WORKDIR, prepare_proxy

CONCURRENCY = (1, 4, 8)


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


def _request(uri: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens}).encode()  # fmt: skip
    request = urllib.request.Request(
        f"{uri}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    latency = time.perf_counter() - started
    predictions = answer["predictions"] if isinstance(answer, dict) else answer
    return latency, predictions[0]["usage"]["completion_tokens"]


def _one_level(uri: str, clients: int, per_client: int, max_tokens: int) -> dict[str, float]:
    def client(index: int) -> list[tuple[float, int]]:
        return [
            _request(uri, BATCH_PROMPTS[(index + turn) % len(BATCH_PROMPTS)], max_tokens)
            for turn in range(per_client)
        ]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [row for rows in pool.map(client, range(clients)) for row in rows]
    wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    return {
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(tokens for _, tokens in results) / wall,
        "p50_latency_s": statistics.median(latencies),
        "p95_latency_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
    }


def measure(
    requests_per_client: int, max_tokens: int, repeats: int, workdir: Path = DEFAULT_WORKDIR
) -> dict[str, object]:
    """Each concurrency level's figures (median, min, max over ``repeats``)."""
    _, _, pyfunc_dir = prepare_proxy(workdir)
    levels = {}
    with served_model(pyfunc_dir) as uri:
        _request(uri, BATCH_PROMPTS[0], max_tokens)  # warm-up
        for clients in CONCURRENCY:
            print(f"serving: {clients} concurrent clients ...", file=sys.stderr)
            samples = [
                _one_level(uri, clients, requests_per_client, max_tokens) for _ in range(repeats)
            ]
            levels[str(clients)] = {
                key: summarise([sample[key] for sample in samples]) for key in samples[0]
            }
    return {
        "requests_per_client": requests_per_client,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "levels": levels,
    }


def markdown(figures: dict[str, object]) -> str:
    """The serving table."""
    lines = [
        f"`mlflow models serve` (1 worker) of the int4 proxy pyfunc, {figures['max_tokens']} new "
        f"tokens per request, {figures['requests_per_client']} requests per client, median "
        f"(min-max) of {figures['repeats']}.",
        "",
        "| concurrent clients | requests/s | generated tokens/s | p50 latency (s) "
        "| p95 latency (s) |",
        "|---|---|---|---|---|",
    ]
    for clients, row in figures["levels"].items():
        lines.append(
            f"| {clients} | {cell(row['requests_per_s'], 2)} | {cell(row['tokens_per_s'], 1)} | "
            f"{cell(row['p50_latency_s'], 3)} | {cell(row['p95_latency_s'], 3)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="built models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    arguments = parser.parse_args()
    figures = measure(
        arguments.requests_per_client, arguments.max_tokens, arguments.repeats, arguments.workdir
    )
    print(markdown(figures))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Where the time of one served ``predict`` goes on the shared rows: reading the prompts, the
decode steps' graph runs, the per-row Python work between steps, and everything outside the rows
(validation, the chat template, waiting for the decode loop's thread).

This is the profile behind the serving benchmark's share of the ceiling: ``benchmarks.batch_steps``
times decode steps with no prompts, while every request a client sends has its prompt read
first. Reading a prompt is compute-bound, so it gets little cheaper per token when more rows
arrive together, while a decode step of 8 rows costs far less than 8 steps of one.

The model is the benchmark proxy's int4 build saved as our pyfunc (``benchmarks.model_speed``),
loaded in process; ``--rows`` requests (the proxy's 8 prompts in turn) go in one ``predict``, each
asking for ``--max-tokens`` new tokens. Then ``--prompt-tokens`` tokens are read by the graph
alone, as 1 row and as 8 rows of an eighth each: the cost of reading a prompt token with no
decoding around it. Figures are medians (min-max) of ``--repeats`` runs.

Each row's first token is chosen when its prompt is read, so the decode steps' own tokens/s
counts the others only. A prompt longer than ``PROMPT_CHUNK_TOKENS`` would be read a chunk per
step, outside ``_decode``, and land in "outside the rows"; the proxy's prompts are 14 to 24
tokens.

Usage: ``python -m benchmarks.rows_breakdown [--rows 1 --rows 8] [--max-tokens 32]
[--repeats 5] [--prompt-tokens 240] [--json FILE]``
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import cell, summarise
from benchmarks.model_speed import BATCH_PROMPTS, DEFAULT_WORKDIR, prepare_proxy


class _Timers:
    """Wraps the served copy's SharedRows so that every predict's time is split by part."""

    def __init__(self, shared_rows_class: type) -> None:
        self.seconds: collections.Counter = collections.Counter()
        self.prompt_tokens = 0
        self._in_decode = False
        timers = self  # the wrappers below take the rows' own ``self``
        add, decode, execute = (shared_rows_class.add, shared_rows_class._decode,
                                shared_rows_class._execute)  # fmt: skip

        def timed_add(rows: Any, sequences: list, end_tokens: set[int]) -> None:
            timers.prompt_tokens += sum(len(sequence.ids) for sequence in sequences)
            started = time.perf_counter()
            try:
                return add(rows, sequences, end_tokens)
            finally:
                timers.seconds["prompts"] += time.perf_counter() - started

        def timed_decode(rows: Any, end_tokens: set[int]) -> None:
            started, timers._in_decode = time.perf_counter(), True
            try:
                return decode(rows, end_tokens)
            finally:
                timers._in_decode = False
                timers.seconds["decode"] += time.perf_counter() - started

        def timed_execute(rows: Any, binding: Any, ids: np.ndarray, mask: np.ndarray) -> Any:
            started = time.perf_counter()
            try:
                return execute(rows, binding, ids, mask)
            finally:
                if timers._in_decode:
                    timers.seconds["graph"] += time.perf_counter() - started

        shared_rows_class.add = timed_add
        shared_rows_class._decode = timed_decode
        shared_rows_class._execute = timed_execute

    def reset(self) -> None:
        self.seconds.clear()
        self.prompt_tokens = 0


def _requests(rows: int, max_tokens: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": BATCH_PROMPTS[row % len(BATCH_PROMPTS)]}],
         "max_tokens": max_tokens}
        for row in range(rows)
    ]  # fmt: skip


def measure_predicts(pyfunc_dir: Path, rows_levels: list[int], max_tokens: int,
                     repeats: int) -> dict[str, dict]:  # fmt: skip
    """Each part's milliseconds per ``predict`` of ``rows`` requests, for each of
    ``rows_levels``."""
    import mlflow

    from llm_packager.models.served_code import SERVED_PACKAGE

    model = mlflow.pyfunc.load_model(str(pyfunc_dir))
    if model.unwrap_python_model()._loop._rows is None:
        raise SystemExit(f"{pyfunc_dir}: this model decodes with Generators, not the shared rows")
    model.predict(_requests(1, 2))  # warm-up
    timers = _Timers(sys.modules[f"{SERVED_PACKAGE}.shared_rows"].SharedRows)
    figures: dict[str, dict] = {}
    for rows in rows_levels:
        requests = _requests(rows, max_tokens)
        # Warm-up at this size. The rows free their cache whenever they go idle, so every
        # predict below allocates it again, inside "reading prompts", as a served request does.
        model.predict(requests)
        runs: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(repeats):
            timers.reset()
            started = time.perf_counter()
            answers = model.predict(requests)
            wall = time.perf_counter() - started
            produced = sum(answer["usage"]["completion_tokens"] for answer in answers)
            parts = timers.seconds
            runs["predict"].append(wall * 1000)
            runs["prompts"].append(parts["prompts"] * 1000)
            runs["graph"].append(parts["graph"] * 1000)
            runs["python"].append((parts["decode"] - parts["graph"]) * 1000)
            runs["outside"].append((wall - parts["prompts"] - parts["decode"]) * 1000)
            runs["tokens_per_s"].append(produced / wall)
            # Each row's first token came with its prompt; the steps made the rest.
            runs["steps_only_tokens_per_s"].append((produced - rows) / parts["decode"])
            runs["prompt_tokens"].append(timers.prompt_tokens)
        figures[str(rows)] = {name: summarise(values) for name, values in runs.items()}
    return figures


def measure_prompt_reading(onnx_dir: Path, tokens: int, repeats: int) -> dict[str, dict]:
    """Milliseconds per prompt token read by the graph alone: ``tokens`` as 1 row, and as 8 rows
    of ``tokens // 8``."""
    import onnxruntime as ort

    from llm_packager.serving.decode_loop import usable_cores
    from llm_packager.serving.shared_rows import CACHE_DTYPES

    decoder = json.loads((onnx_dir / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    session = ort.InferenceSession(str(onnx_dir / decoder["filename"]), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    types = {node.name: node.type for node in session.get_inputs()}
    ids_type = np.int32 if types["input_ids"] == "tensor(int32)" else np.int64
    cache_type = CACHE_DTYPES.get(types["past_key_values.0.key"])
    if cache_type is None:
        raise SystemExit(f"{onnx_dir}: a {types['past_key_values.0.key']} cache is not measured")
    heads, head_size = int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    figures = {}
    for rows in (1, 8):
        length = tokens // rows
        feeds = {"input_ids": np.full((rows, length), 7, ids_type),
                 "attention_mask": np.ones((rows, length), np.int64)}  # fmt: skip
        for name in types:
            if name.startswith("past_key_values."):
                feeds[name] = np.zeros((rows, heads, 0, head_size), cache_type)
        session.run(["logits"], feeds)  # warm-up
        per_token = []
        for _ in range(repeats):
            started = time.perf_counter()
            session.run(["logits"], feeds)
            per_token.append((time.perf_counter() - started) * 1000 / (rows * length))
        figures[f"{rows}x{length}"] = summarise(per_token)
    return figures


def markdown(predicts: dict[str, dict], reading: dict[str, dict], max_tokens: int) -> str:
    """Both tables, as docs/performance.md shows them."""
    lines = [
        f"One `predict` of N requests, {max_tokens} new tokens each, in process; milliseconds per "
        "predict:",
        "",
        "| rows | predict | reading prompts (tokens) | decode: graph runs | decode: Python per row "
        "| outside the rows | tokens/s | tokens/s of the decode steps alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rows, figures in predicts.items():
        lines.append(
            f"| {rows} | {cell(figures['predict'], 0)} | {cell(figures['prompts'], 0)} "
            f"({figures['prompt_tokens']['median']:.0f}) | {cell(figures['graph'], 0)} | "
            f"{cell(figures['python'], 1)} | {cell(figures['outside'], 1)} | "
            f"{cell(figures['tokens_per_s'], 1)} | {cell(figures['steps_only_tokens_per_s'], 1)} |"
        )
    lines += ["", "The graph alone reading prompt tokens (no cache before them):", "",
              "| rows x tokens | ms per prompt token |", "|---|---|"]  # fmt: skip
    lines += [f"| {shape} | {cell(figures, 2)} |" for shape, figures in reading.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="requests per predict (1, 8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=240)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="built models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    arguments = parser.parse_args()
    _, onnx_dir, pyfunc_dir = prepare_proxy(arguments.workdir)
    predicts = measure_predicts(pyfunc_dir, arguments.rows or [1, 8], arguments.max_tokens,
                                arguments.repeats)  # fmt: skip
    reading = measure_prompt_reading(onnx_dir, arguments.prompt_tokens, arguments.repeats)
    print(markdown(predicts, reading, arguments.max_tokens))
    if arguments.json:
        figures = {"max_tokens": arguments.max_tokens, "predicts": predicts, "reading": reading}
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

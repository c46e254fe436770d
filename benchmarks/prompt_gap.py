"""The longest wait between two tokens of a running stream while a long prompt arrives, with the
prompt read whole between two steps (as before) and read a chunk per step (``SharedRows``'s
``prompt_chunk_tokens``).

One greedy stream decodes ``--tokens`` tokens on the served model's own decode loop and shared
rows (no server); once it has produced ``--warmup`` tokens, a request with a prompt of
``--prompt-tokens`` tokens is submitted. The figure is the longest gap between two of the
running stream's tokens, and the median gap, in milliseconds, median of ``--repeats`` runs; the
long prompt's time to its first token is shown too. The build must have a context longer than the
prompt (the tiny test model's 512 positions are too few; SmolLM2-135M's build has 8,192).

Usage: ``python -m benchmarks.prompt_gap FOLDER [--prompt-tokens 2000] [--tokens 200]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from pathlib import Path

WHOLE = 10**9  # a chunk longer than any prompt: the prompt is read in one run, as before


def _loop(folder: Path, chunk: int):
    import onnxruntime_genai as og

    from llm_packager.serving.decode_loop import DecodeLoop, usable_cores
    from llm_packager.serving.shared_rows import SharedRows

    config = og.Config(str(folder))
    tokenizer = og.Tokenizer(config)
    genai_config = json.loads((folder / "genai_config.json").read_text())
    rows = SharedRows.open(folder, genai_config, tokenizer, usable_cores(), 8)
    if rows is None:
        raise SystemExit(f"{folder}: the shared rows cannot decode this build")
    rows.prompt_chunk_tokens = chunk
    loop = DecodeLoop(
        None, tokenizer, end_tokens=set(), pad_token=0,
        context_length=int(genai_config["model"]["context_length"]),
        max_batch_size=8, max_queued_requests=8, gather_seconds=0, rows=rows,
    )  # fmt: skip
    return loop, genai_config


def _one_run(loop, vocab: int, tokens: int, warmup: int, prompt_tokens: int) -> dict:
    from llm_packager.serving.sequence import Sequence

    options = {"max_tokens": tokens, "sampling": False, "temperature": 1.0, "top_p": 1.0,
               "stop": [], "seed": None, "n": 1}  # fmt: skip
    arrivals: list[float] = []
    long_first: list[float] = []
    warm, done = threading.Event(), threading.Event()

    def running(index, event, value):
        if event == "delta":
            arrivals.append(time.perf_counter())
            if len(arrivals) == warmup:
                warm.set()
        elif event in ("done", "error"):
            done.set()

    def long_report(index, event, value):
        if event in ("delta", "done", "error") and not long_first:
            long_first.append(time.perf_counter())

    stream = [Sequence(0, [1, 2, 3, 4], dict(options), running, owner=object(), streaming=True)]
    loop.submit(stream)
    warm.wait(120)
    prompt = [int(token) % vocab for token in range(100, 100 + prompt_tokens)]
    long_request = [Sequence(0, prompt, {**options, "max_tokens": 1}, long_report,
                             owner=object(), streaming=True)]  # fmt: skip
    sent = time.perf_counter()
    loop.submit(long_request)
    done.wait(300)
    loop.release(stream), loop.release(long_request)
    gaps = [(later - earlier) * 1000 for earlier, later in itertools.pairwise(arrivals)]
    first_token = (long_first[0] - sent) * 1000 if long_first else None
    return {"worst_gap_ms": max(gaps), "median_gap_ms": statistics.median(gaps),
            "long_prompt_first_token_ms": first_token}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an ONNX build folder (genai_config.json)")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    results = {}
    for name, chunk in (("whole prompt (before)", WHOLE), ("chunks of 256 (after)", 256)):
        loop, genai_config = _loop(arguments.folder, chunk)
        vocab = int(genai_config["model"]["vocab_size"])
        runs = [_one_run(loop, vocab, arguments.tokens, arguments.warmup, arguments.prompt_tokens)
                for _ in range(arguments.repeats)]  # fmt: skip
        results[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"{name:24} worst gap {results[name]['worst_gap_ms']:8.1f} ms   median gap "
              f"{results[name]['median_gap_ms']:6.1f} ms   long prompt's first token "
              f"{results[name]['long_prompt_first_token_ms']:8.1f} ms", flush=True)  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Decode steps of 1 to 16 sequences at once, in the served ONNX model's two decoders:
onnxruntime-genai Generators (``onnx.batching=generators``) and the model's own shared
key/value rows (``auto`` on CPU builds), on the benchmark proxy's int4 builds.

This is the ceiling under the serving benchmark: how much one step of N sequences costs against
a step of one, with no server, no scheduling and no prompts. Each figure is milliseconds per
decode step (every sequence gets one token) after the prompts are read, median (min-max) of
``--repeats`` runs of ``--steps`` steps, and the generated tokens/s that gives. Both decoders run
the same code the served model runs per step, including its per-token Python work (detokenizing).

Usage: ``python -m benchmarks.batch_steps [--steps 48] [--repeats 3] [--folder BUILD ...]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import cell, summarise
from benchmarks.model_speed import BATCH_PROMPTS, BUILDS, DEFAULT_WORKDIR, prepare_proxy

SEQUENCES = (1, 2, 4, 8, 16)
DECODERS = ("generators", "shared rows")


def _decoder(folder: Path, name: str):
    """A function that starts ``count`` sequences and returns (one step, stop)."""
    import onnxruntime_genai as og

    from llm_packager.serving.decode_loop import usable_cores
    from llm_packager.serving.generators import GeneratorBatch
    from llm_packager.serving.sequence import Sequence
    from llm_packager.serving.shared_rows import SharedRows

    threads = usable_cores()
    config = og.Config(str(folder))
    config.overlay(json.dumps(
        {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    ))  # fmt: skip
    tokenizer = og.Tokenizer(config)
    genai_config = json.loads((folder / "genai_config.json").read_text())
    if name == "generators":
        model = og.Model(config)
    else:
        rows = SharedRows.open(folder, genai_config, tokenizer, threads, max(SEQUENCES))
        if rows is None:
            raise SystemExit(f"{folder}: the shared-rows decoder does not apply to this build")

    def start(count: int, steps: int):
        options = {"max_tokens": steps + 8, "sampling": False, "temperature": 1.0, "top_p": 1.0,
                   "seed": None, "stop": []}  # fmt: skip
        sequences = [
            Sequence(index, [int(t) for t in tokenizer.encode(
                BATCH_PROMPTS[index % len(BATCH_PROMPTS)])], options,
                lambda *event: None, owner=None, streaming=False)
            for index in range(count)
        ]  # fmt: skip
        if name == "generators":
            batch = GeneratorBatch(model, tokenizer, int(tokenizer.pad_token_id), sequences)
            return (lambda: batch.step(set())), (lambda: None)
        rows.add(sequences, set())

        def stop() -> None:
            for sequence in sequences:
                sequence.cancelled = True
            rows.step(set())  # a cancelled sequence gives its row up at the end of a step

        return (lambda: rows.step(set())), stop

    return start


def measure(folders: list[Path], steps: int, repeats: int) -> dict[str, dict]:
    figures: dict[str, dict] = {}
    for folder in folders:
        for name in DECODERS:
            start = _decoder(folder, name)
            for count in SEQUENCES:
                print(f"{folder.name}, {name}: {count} sequences ...", file=sys.stderr)
                per_step = []
                for _ in range(repeats):
                    step, stop = start(count, steps + 2)
                    step(), step()  # warm-up
                    began = time.perf_counter()
                    for _ in range(steps):
                        step()
                    per_step.append((time.perf_counter() - began) / steps)
                    stop()
                figures.setdefault(folder.name, {}).setdefault(name, {})[str(count)] = {
                    "ms_per_step": summarise([seconds * 1000 for seconds in per_step]),
                    "tokens_per_s": summarise([count / seconds for seconds in per_step]),
                }
    return figures


def markdown(figures: dict[str, dict]) -> str:
    lines = [
        "| build | sequences | " + " | ".join(f"{name}: ms/step, tokens/s" for name in DECODERS)
        + " |",
        "|---|---|" + "---|" * len(DECODERS),
    ]  # fmt: skip
    for build, decoders in figures.items():
        for count in map(str, SEQUENCES):
            cells = [
                f"{cell(decoders[name][count]['ms_per_step'], 1)}, "
                f"{decoders[name][count]['tokens_per_s']['median']:.0f}"
                for name in DECODERS
            ]
            lines.append(f"| {build} | {count} | " + " | ".join(cells) + " |")
    lines.append("")
    for build, decoders in figures.items():
        medians = {
            name: {count: decoders[name][count]["tokens_per_s"]["median"] for count in ("1", "8")}
            for name in DECODERS
        }
        ratios = ", ".join(f"{name} {m['8'] / m['1']:.2f}x" for name, m in medians.items())
        lines.append(f"{build}: tokens/s of 8 sequences against 1: {ratios}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="built models")
    parser.add_argument(
        "--folder", type=Path, action="append", help="an ONNX build (default: the proxy's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    arguments = parser.parse_args()
    if not arguments.folder:
        prepare_proxy(arguments.workdir)
    folders = arguments.folder or [arguments.workdir / name for name in BUILDS]
    figures = measure(folders, arguments.steps, arguments.repeats)
    print(markdown(figures))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

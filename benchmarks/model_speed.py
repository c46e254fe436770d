"""Decode speed, time to first token and peak memory: transformers fp32 vs onnxruntime-genai int4
(raw, and through our MLflow pyfunc wrapper), on a Phi-3-architecture proxy of ~170 M parameters,
each against its memory-bandwidth bound; and a batch of 8 chat requests through the pyfunc against
8 single calls.

The proxy is the synthetic Phi-3 of ``llm_packager.sources.synthetic`` at a size that makes 2 CPU
cores
work (random weights: the figures are about speed, never quality). Each runtime is measured in its
own process, so peak RSS is that runtime's alone. All three are timed the same way:

- time to first token (TTFT) = latency of a request for 1 new token (prompt processing + 1 step);
- decode tokens/s = (N - 1) / (latency for N new tokens - TTFT), all greedy, batch size 1;
- each figure is the median of ``--repeats`` runs after one warm-up.

Decoding one sequence reads every weight once per token (bar the embedding table, of which one row
is read), so no runtime can beat ``copy bandwidth / weight bytes per token``. The copy bandwidth is
measured here: all cores copying a buffer far larger than the caches, counting bytes read plus
bytes written. Batch against single: the same 8 chat requests, as one ``predict`` of 8 rows and as
8 ``predict`` calls, compared by generated tokens per second.

Usage: ``python -m benchmarks.model_speed [--new-tokens 64] [--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import PROJECT_DIR, cell
from llm_packager.evaluation.worker import peak_rss_mib
from llm_packager.models.served_code import MODEL_CODE, SERVING_SOURCE, served_code_paths
from llm_packager.serving.keys import (
    BATCHING_KEY,
    MAX_BATCH_SIZE_KEY,
    MAX_TOKENS_CAP_KEY,
    MODEL_NAME_KEY,
    ONNX_ARTIFACT_KEY,
)

PROMPT = [{"role": "user", "content": "Tell me a long story about the capital of Spain and atoms."}]
PROXY_SIZES = {
    "vocab_size": 32064,  # Phi-3-mini's vocabulary, so the output layer costs what it really does
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 4096,
    "seed": 0,
}
RUNTIMES = (
    "transformers-fp32",
    "onnxruntime-genai-int4",
    "pyfunc-int4",
    "onnxruntime-genai-int4-block128",
)
# The builder options of conf/onnx/build.yaml, and a coarser quantisation block for comparison.
BUILDS = {
    "onnx-int4": {"accuracy_level": "4", "block_size": "32"},
    "onnx-int4-block128": {"accuracy_level": "4", "block_size": "128"},
}
THREADS = len(os.sched_getaffinity(0))
BATCH_WORKER = "pyfunc-batch"
BATCH_PROMPTS = (
    "Tell me a long story about the capital of Spain and atoms.",
    "Explain how a refrigerator works.",
    "Write a poem about the sea.",
    "What is the difference between weather and climate?",
    "List some uses of copper.",
    "Describe a walk through a forest in autumn.",
    "Why is the sky blue?",
    "Summarise the rules of chess.",
)
# Tables and caches: only one row of each is read per token.
_NOT_READ_PER_TOKEN = ("embed_tokens", "cos_cache", "sin_cache")
DEFAULT_WORKDIR = Path.home() / ".cache" / "llm_packager" / "benchmark-proxy"


def _time_requests(generate, new_tokens: int, repeats: int) -> dict[str, float]:
    """``generate(max_new)`` runs one request and returns the number of new tokens produced."""
    generate(new_tokens)  # warm-up: first-call allocations and kernel selection
    first, full, produced = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        generate(1)
        first.append(time.perf_counter() - started)
        started = time.perf_counter()
        produced.append(generate(new_tokens))
        full.append(time.perf_counter() - started)
    ttft, total = statistics.median(first), statistics.median(full)
    tokens = statistics.median(produced)
    # Each repeat's own decode rate, for the spread; the median comes from the median times.
    decode = [
        (count - 1) / (whole - one) for count, whole, one in zip(produced, full, first, strict=True)
    ]
    return {
        "ttft_s": ttft,
        "latency_s": total,
        "new_tokens": tokens,
        "decode_tokens_per_s": (tokens - 1) / (total - ttft),
        "decode_min": min(decode),
        "decode_max": max(decode),
        "ttft_min_s": min(first),
        "ttft_max_s": max(first),
        "latency_min_s": min(full),
        "latency_max_s": max(full),
    }


def _worker_transformers(hf_dir: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )

    def generate(max_new: int) -> int:
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        return output.shape[1] - inputs["input_ids"].shape[1]

    return _time_requests(generate, new_tokens, repeats)


def _worker_onnxruntime_genai(onnx_dir: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    import onnxruntime_genai as og

    config = og.Config(str(onnx_dir))
    # The same thread pool as the pyfunc sets up, so the two differ only by the wrapper.
    config.overlay(
        json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}})
    )
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(
        tokenizer.apply_chat_template(json.dumps(PROMPT), add_generation_prompt=True)
    )

    def generate(max_new: int) -> int:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        produced = 0
        while not generator.is_done():
            generator.generate_next_token()
            produced += 1
        return produced

    return _time_requests(generate, new_tokens, repeats)


def _worker_pyfunc(pyfunc_dir: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    import mlflow

    model = mlflow.pyfunc.load_model(str(pyfunc_dir))

    def generate(max_new: int) -> int:
        answer = model.predict({"messages": PROMPT, "max_tokens": max_new})[0]
        # The end-of-turn token is generated but not counted in usage; count it like the others.
        return answer["usage"]["completion_tokens"] + (
            answer["choices"][0]["finish_reason"] == "stop"
        )

    return _time_requests(generate, new_tokens, repeats)


def _worker_pyfunc_batch(pyfunc_dir: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    import mlflow

    model = mlflow.pyfunc.load_model(str(pyfunc_dir))
    requests = [
        {"messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens}
        for prompt in BATCH_PROMPTS
    ]

    def tokens(answers: list[dict]) -> int:
        return sum(answer["usage"]["completion_tokens"] for answer in answers)

    model.predict(requests)  # warm-up
    single, batch = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        produced = tokens([model.predict(request)[0] for request in requests])
        single.append(produced / (time.perf_counter() - started))
        started = time.perf_counter()
        produced = tokens(model.predict(requests))
        batch.append(produced / (time.perf_counter() - started))
    return {
        "single_tokens_per_s": statistics.median(single),
        "single_min": min(single),
        "single_max": max(single),
        "batch_tokens_per_s": statistics.median(batch),
        "batch_min": min(batch),
        "batch_max": max(batch),
        "requests": len(requests),
    }


def copy_bandwidth_bytes_per_s(repeats: int = 5, size_mib: int = 512) -> float:
    """Bytes read plus written per second when every core copies its share of a large buffer."""
    import numpy as np

    threads = os.cpu_count() or 1
    source = np.ones(size_mib * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    slices = [slice(i * len(source) // threads, (i + 1) * len(source) // threads)
              for i in range(threads)]  # fmt: skip
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:  # numpy copies release the GIL
        for _ in range(repeats + 1):
            started = time.perf_counter()
            list(pool.map(lambda part: np.copyto(target[part], source[part]), slices))
            best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def _safetensors_bytes_per_token(hf_dir: Path) -> int:
    total = 0
    for path in hf_dir.glob("*.safetensors"):
        with path.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        total += sum(
            entry["data_offsets"][1] - entry["data_offsets"][0]
            for name, entry in header.items()
            if name != "__metadata__" and not any(skip in name for skip in _NOT_READ_PER_TOKEN)
        )
    return total


def _onnx_bytes_per_token(onnx_dir: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    total = 0
    for initializer in model.graph.initializer:
        if any(skip in initializer.name for skip in _NOT_READ_PER_TOKEN):
            continue
        external = {entry.key: entry.value for entry in initializer.external_data}
        total += int(external["length"]) if "length" in external else len(initializer.raw_data)
    return total


def prepare_proxy(
    workdir: Path,
    model_code: Path = MODEL_CODE,
    model_config: dict | None = None,
    build: str = "onnx-int4",
    serving_code: Path = SERVING_SOURCE,
) -> tuple[Path, Path, Path]:
    """The proxy's Hugging Face folder, its ``build`` (one of ``BUILDS``), and that build saved as
    our pyfunc from ``model_code`` and ``serving_code`` (the model's file and its serving package;
    another version of them, to compare against it), with ``model_config`` added to its serving
    settings."""
    import mlflow

    from llm_packager.choices import ExecutionProvider, OnnxPrecision
    from llm_packager.models.onnx_build import build_onnx_model, chat_signature
    from llm_packager.sources.synthetic import SyntheticPhi3Spec, build_synthetic_phi3

    hf_dir = workdir / "hf"
    if not (hf_dir / "model.safetensors").exists():
        build_synthetic_phi3(SyntheticPhi3Spec(**PROXY_SIZES), hf_dir)
    for name, options in BUILDS.items():
        if not (workdir / name / "genai_config.json").exists():
            build_onnx_model(
                hf_dir, workdir / name, precision=OnnxPrecision.int4,
                execution_provider=ExecutionProvider.cpu,
                extra_options=options, log_path=workdir / f"{name}-builder.log",
            )  # fmt: skip
    onnx_dir = workdir / build
    pyfunc_dir = workdir / "pyfunc"
    # Saved afresh every time: it carries a copy of the model code, which may have changed.
    shutil.rmtree(pyfunc_dir, ignore_errors=True)
    with served_code_paths(serving_code) as code_paths:
        mlflow.pyfunc.save_model(
            str(pyfunc_dir),
            python_model=str(model_code),
            code_paths=code_paths,
            artifacts={ONNX_ARTIFACT_KEY: str(onnx_dir)},
            model_config={
                MODEL_NAME_KEY: "proxy",
                MAX_TOKENS_CAP_KEY: 1024,
                MAX_BATCH_SIZE_KEY: 8,
                BATCHING_KEY: "auto",
                **(model_config or {}),
            },
            signature=chat_signature(),
        )
    return hf_dir, onnx_dir, pyfunc_dir


def _run_worker(runtime: str, folder: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.model_speed", "--worker", runtime,
         "--folder", str(folder), "--new-tokens", str(new_tokens), "--repeats", str(repeats)],
        capture_output=True, text=True, check=True, cwd=PROJECT_DIR,
    )  # fmt: skip
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(new_tokens: int, repeats: int, workdir: Path = DEFAULT_WORKDIR) -> dict[str, object]:
    """Every runtime's figures, its bandwidth bound, the batch comparison and the ratios."""
    workdir.mkdir(parents=True, exist_ok=True)
    hf_dir, onnx_dir, pyfunc_dir = prepare_proxy(workdir)
    folders = dict(
        zip(RUNTIMES, (hf_dir, onnx_dir, pyfunc_dir, workdir / "onnx-int4-block128"), strict=True)
    )
    bandwidth = copy_bandwidth_bytes_per_s()
    weight_bytes = {
        "transformers-fp32": _safetensors_bytes_per_token(hf_dir),
        "onnxruntime-genai-int4": _onnx_bytes_per_token(onnx_dir),
        "pyfunc-int4": _onnx_bytes_per_token(onnx_dir),
        "onnxruntime-genai-int4-block128": _onnx_bytes_per_token(workdir / "onnx-int4-block128"),
    }
    results = {}
    for runtime in RUNTIMES:
        print(f"model speed: {runtime} ...", file=sys.stderr)
        figures = _run_worker(runtime, folders[runtime], new_tokens, repeats)
        bound = bandwidth / weight_bytes[runtime]
        results[runtime] = {
            **figures,
            "weight_bytes_per_token": weight_bytes[runtime],
            "bandwidth_bound_tokens_per_s": bound,
            "fraction_of_bound": figures["decode_tokens_per_s"] / bound,
        }
    print("model speed: batch of 8 vs 8 single calls ...", file=sys.stderr)
    batch = _run_worker(BATCH_WORKER, pyfunc_dir, new_tokens, repeats)
    hf, raw, wrapped, _ = (results[runtime] for runtime in RUNTIMES)
    return {
        "parameters_millions": _parameters_millions(hf_dir),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "runtimes": results,
        "batch": batch,
        "ratios": {
            "pyfunc_vs_raw_decode": wrapped["decode_tokens_per_s"] / raw["decode_tokens_per_s"],
            "int4_vs_transformers_decode": raw["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
            "int4_vs_transformers_peak_rss": raw["peak_rss_mib"] / hf["peak_rss_mib"],
            "batch_vs_single_tokens_per_s": batch["batch_tokens_per_s"]
            / batch["single_tokens_per_s"],
        },
    }


def _parameters_millions(hf_dir: Path) -> float:
    from llm_packager.sources.manifest import count_safetensors_parameters

    return count_safetensors_parameters(hf_dir) / 1e6


def _range(figures: dict[str, float], key: str, low: str, high: str, digits: int) -> str:
    return cell({"median": figures[key], "min": figures[low], "max": figures[high]}, digits)


def markdown(figures: dict[str, object]) -> str:
    """The model speed and batch tables."""
    lines = [
        f"Proxy: {figures['parameters_millions']:.1f} M parameters, {figures['new_tokens']} new "
        f"tokens, median (min-max) of {figures['repeats']}. Copy bandwidth "
        f"{figures['copy_bandwidth_gb_per_s']:.1f} GB/s.",
        "",
        "| runtime | decode tokens/s | time to first token (s) | peak RSS (MiB) "
        "| weight MB read per token | bandwidth bound (tokens/s) | fraction of bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for runtime, row in figures["runtimes"].items():
        lines.append(
            f"| {runtime} | {_range(row, 'decode_tokens_per_s', 'decode_min', 'decode_max', 1)} | "
            f"{_range(row, 'ttft_s', 'ttft_min_s', 'ttft_max_s', 3)} | "
            f"{row['peak_rss_mib']:.0f} | {row['weight_bytes_per_token'] / 1e6:.1f} | "
            f"{row['bandwidth_bound_tokens_per_s']:.1f} | {row['fraction_of_bound']:.0%} |"
        )
    batch, ratios = figures["batch"], figures["ratios"]
    lines += [
        "",
        f"Batch of {batch['requests']} chat requests through the pyfunc: "
        f"{_range(batch, 'batch_tokens_per_s', 'batch_min', 'batch_max', 1)} generated tokens/s, "
        f"against {_range(batch, 'single_tokens_per_s', 'single_min', 'single_max', 1)} for "
        f"{batch['requests']} single calls: {ratios['batch_vs_single_tokens_per_s']:.1f}x.",
        "",
        f"pyfunc / raw decode: {ratios['pyfunc_vs_raw_decode']:.0%}; int4 / transformers decode: "
        f"{ratios['int4_vs_transformers_decode']:.1f}x; int4 / transformers peak RSS: "
        f"{ratios['int4_vs_transformers_peak_rss']:.0%}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="built models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", choices=(*RUNTIMES, BATCH_WORKER), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.worker:
        workers = {
            "transformers-fp32": _worker_transformers,
            "onnxruntime-genai-int4": _worker_onnxruntime_genai,
            "onnxruntime-genai-int4-block128": _worker_onnxruntime_genai,
            "pyfunc-int4": _worker_pyfunc,
            BATCH_WORKER: _worker_pyfunc_batch,
        }
        figures = workers[arguments.worker](
            arguments.folder, arguments.new_tokens, arguments.repeats
        )
        print(json.dumps({**figures, "peak_rss_mib": peak_rss_mib()}))
        return
    figures = measure(arguments.new_tokens, arguments.repeats, arguments.workdir)
    print(markdown(figures))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Decode speed, time to first token and peak memory: transformers fp32 vs onnxruntime-genai int4
(raw, and through our MLflow pyfunc wrapper), on a Phi-3-architecture proxy of ~170 M parameters.

The proxy is the synthetic Phi-3 of ``llm_packager.synthetic`` at a size that makes 2 CPU cores
work (random weights: the figures are about speed, never quality). Each runtime is measured in its
own process, so peak RSS is that runtime's alone. All three are timed the same way:

- time to first token (TTFT) = latency of a request for 1 new token (prompt processing + 1 step);
- decode tokens/s = (N - 1) / (latency for N new tokens - TTFT), all greedy, batch size 1;
- each figure is the median of ``--repeats`` runs after one warm-up.

Usage: ``python benchmarks/onnx_speed.py [--new-tokens 64] [--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

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
RUNTIMES = ("transformers-fp32", "onnxruntime-genai-int4", "pyfunc-int4")

# Imported after the project root is on sys.path. VmHWM belongs to the process's memory map,
# which exec replaces, so it is each worker's own peak; getrusage's ru_maxrss is not (Linux
# carries it over from the forking parent).
from llm_packager.eval_worker import peak_rss_mib  # noqa: E402


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
    return {
        "ttft_s": ttft,
        "latency_s": total,
        "new_tokens": tokens,
        "decode_tokens_per_s": (tokens - 1) / (total - ttft),
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

    model = og.Model(str(onnx_dir))
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


def _prepare(workdir: Path) -> tuple[Path, Path, Path]:
    import mlflow

    from llm_packager.manifest import count_safetensors_parameters
    from llm_packager.onnx_build import build_onnx_model, chat_signature
    from llm_packager.synthetic import SyntheticPhi3Spec, build_synthetic_phi3

    hf_dir = workdir / "hf"
    if not (hf_dir / "model.safetensors").exists():
        build_synthetic_phi3(SyntheticPhi3Spec(**PROXY_SIZES), hf_dir)
    onnx_dir = workdir / "onnx-int4"
    if not (onnx_dir / "genai_config.json").exists():
        build_onnx_model(
            hf_dir, onnx_dir, precision="int4", execution_provider="cpu",
            extra_options={"accuracy_level": "4", "block_size": "32"},
            log_path=workdir / "builder.log",
        )  # fmt: skip
    pyfunc_dir = workdir / "pyfunc"
    if not (pyfunc_dir / "MLmodel").exists():
        mlflow.pyfunc.save_model(
            str(pyfunc_dir),
            python_model=str(PROJECT_DIR / "llm_packager" / "onnx_chat_model.py"),
            artifacts={"onnx_model": str(onnx_dir)},
            model_config={"model_name": "proxy", "max_tokens_cap": 1024},
            signature=chat_signature(),
        )
    print(f"proxy: {count_safetensors_parameters(hf_dir) / 1e6:.1f} M parameters", file=sys.stderr)
    return hf_dir, onnx_dir, pyfunc_dir


def _run_worker(runtime: str, folder: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", runtime, "--folder", str(folder),
         "--new-tokens", str(new_tokens), "--repeats", str(repeats)],
        capture_output=True, text=True, check=True, cwd=PROJECT_DIR,
    )  # fmt: skip
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| runtime | decode tokens/s | time to first token (s) | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    for runtime, figures in results.items():
        lines.append(
            f"| {runtime} | {figures['decode_tokens_per_s']:.1f} | "
            f"{figures['ttft_s']:.3f} ({figures['ttft_min_s']:.3f}-{figures['ttft_max_s']:.3f}) | "
            f"{figures['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keep built models here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.worker:
        workers = {
            "transformers-fp32": _worker_transformers,
            "onnxruntime-genai-int4": _worker_onnxruntime_genai,
            "pyfunc-int4": _worker_pyfunc,
        }
        figures = workers[arguments.worker](
            arguments.folder, arguments.new_tokens, arguments.repeats
        )
        print(json.dumps({**figures, "peak_rss_mib": peak_rss_mib()}))
        return

    with tempfile.TemporaryDirectory(prefix="onnx-speed-") as scratch:
        workdir = arguments.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        hf_dir, onnx_dir, pyfunc_dir = _prepare(workdir)
        folders = dict(zip(RUNTIMES, (hf_dir, onnx_dir, pyfunc_dir), strict=True))
        results = {}
        for runtime in RUNTIMES:
            print(f"measuring {runtime} ...", file=sys.stderr)
            results[runtime] = _run_worker(runtime, folders[runtime], arguments.new_tokens,
                                           arguments.repeats)  # fmt: skip
    hf, raw, wrapped = (results[runtime] for runtime in RUNTIMES)
    summary = {
        "pyfunc_vs_raw_decode": wrapped["decode_tokens_per_s"] / raw["decode_tokens_per_s"],
        "int4_vs_transformers_decode": raw["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
        "int4_vs_transformers_peak_rss": raw["peak_rss_mib"] / hf["peak_rss_mib"],
    }
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{arguments.new_tokens} new tokens, median of {arguments.repeats}\n")  # fmt: skip
    print(_table(results))
    print(
        f"\npyfunc / raw decode: {summary['pyfunc_vs_raw_decode']:.0%}   "
        f"int4 / transformers decode: {summary['int4_vs_transformers_decode']:.1f}x   "
        f"int4 / transformers peak RSS: {summary['int4_vs_transformers_peak_rss']:.0%}"
    )
    if arguments.json:
        arguments.json.write_text(json.dumps({"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()

"""Our ONNX builds of SmolLM2 beside llama.cpp on the same GGUF file, at batch 1: decode and
prompt tokens/s, time to first token, peak memory, and each one's teacher-forced distance from
the float32 transformers reference.

The contenders:

- **onnx int4, GGUF blocks**: the model builder's int4 graph computing the file's own Q4_1 blocks
  (``onnx.gguf_blocks=auto``, the default: the 4-bit matmuls on float activations, the Q8_0 head
  on int8), and the same blocks with every matmul on int8 activations (``onnx.gguf_blocks=fast``);
- **onnx int4, re-quantized** and **onnx int8**: the builder quantizing the dequantized weights
  (``onnx.gguf_blocks=requantize``; ``precision=int8``);
- **onnx int4, HQQ**: onnxruntime's HQQ quantizer (no calibration data) run over a float32 build,
  block 32; its zero points are floats, which onnxruntime's CPU kernel runs on its slow path;
- **llama.cpp Q4_1**: the file as shipped;
- **llama.cpp Q4_0** and **Q8_0**: llama.cpp's own quantizer run on the Q4_1 file (with
  ``allow_requantize``), since only the Q4_1 file is reachable offline. Q4_0 carries two
  quantizations, as the re-quantized ONNX build does; Q8_0 holds the Q4_1 values nearly as
  they are.

Every contender gets the same prompt token ids (the reference tokenizer's), greedy decoding of
``--new-tokens`` tokens with the end token ignored, and ``--threads`` threads; each measurement
runs in its own process, so its peak resident memory (VmHWM) is its own. The teacher-forced
figures use the corpus ``evaluate`` uses (the evaluation set's reference answers and
``data/heldout_text.txt``).

llama.cpp is not a dependency of this project and is in no lock: install it to run this
benchmark (it builds from source, about 10 minutes on 2 cores):
``pip install llama-cpp-python==0.3.36``. Without it the llama.cpp rows are skipped with that
message.

Usage: ``python -m benchmarks.peers [--new-tokens 128] [--repeats 3] [--threads 2]
[--json benchmarks/results/peers.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import PROJECT_DIR, cell, summarise

WORKDIR = Path.home() / ".cache" / "llm_packager" / "peers"
INSTALL = "pip install llama-cpp-python==0.3.36"
LLAMA_CPP_TYPES = {"Q4_0": 2, "Q8_0": 7}  # llama.h's LLAMA_FTYPE_MOSTLY_*
# A prompt of a few hundred tokens, so prompt reading is measured, not just its overhead.
PROMPT_CHARACTERS = 1200


def _llama_cpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama.cpp rows skipped: llama-cpp-python is not installed ({INSTALL})"
    return None


def prepare(workdir: Path) -> dict[str, tuple[str, Path]]:
    """Every contender's engine and model path, built once into ``workdir``."""
    from llm_packager.choices import ExecutionProvider, OnnxPrecision
    from llm_packager.models.gguf_blocks import import_gguf_blocks
    from llm_packager.models.onnx_build import build_onnx_model
    from llm_packager.sources.gguf import convert_gguf, packaged_gguf
    from llm_packager.sources.upstream import cache_root

    config = _smollm2_config()
    gguf = packaged_gguf(config["gguf_package"], config["gguf_file"], config["gguf_sha256"],
                         cache_root() / "gguf")  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    hf = workdir / "hf"
    if not (hf / "config.json").is_file():
        convert_gguf(gguf, hf, package=config["gguf_package"])
    options = {"accuracy_level": "4", "block_size": "32"}
    builds = {"onnx int4, re-quantized": OnnxPrecision.int4, "onnx int8": OnnxPrecision.int8}
    contenders: dict[str, tuple[str, Path]] = {}
    for name, precision in builds.items():
        folder = workdir / name.replace(" ", "_").replace(",", "")
        if not (folder / "genai_config.json").is_file():
            build_onnx_model(hf, folder, precision=precision,
                             execution_provider=ExecutionProvider.cpu, extra_options=options,
                             log_path=workdir / f"{folder.name}.log")  # fmt: skip
        contenders[name] = ("onnx", folder)
    imported = {}
    for name, int8_activations in (("onnx int4, GGUF blocks", False),
                                   ("onnx int4, GGUF blocks, int8 activations", True)):  # fmt: skip
        folder = workdir / name.replace(" ", "_").replace(",", "")
        summary = folder / "gguf_blocks.json"
        # A build from before the import chose each matmul's activations is made again.
        if not summary.is_file() or "accuracy_levels" not in json.loads(summary.read_text()):
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(contenders["onnx int4, re-quantized"][1], folder)
            import_gguf_blocks(folder, gguf, int8_activations=int8_activations)
        imported[name] = ("onnx", folder)
    hqq = workdir / "onnx_int4_hqq"
    if not (hqq / "genai_config.json").is_file():
        _hqq_build(hf, workdir, hqq)
    contenders = {**imported, **contenders,
                  "onnx int4, HQQ": ("onnx", hqq)}  # fmt: skip
    if _llama_cpp_missing() is None:
        contenders["llama.cpp Q4_1 (as shipped)"] = ("llama.cpp", gguf)
        for kind, ftype in LLAMA_CPP_TYPES.items():
            target = workdir / f"smollm2-{kind}-from-Q4_1.gguf"
            if not target.is_file():
                _llama_cpp_quantize(gguf, target, ftype)
            contenders[f"llama.cpp {kind} (from Q4_1)"] = ("llama.cpp", target)
    return contenders


def _hqq_build(hf: Path, workdir: Path, destination: Path) -> None:
    """A float32 build, then onnxruntime's HQQ pass over its MatMuls (its quantizer refuses the
    tied embedding's Gather, which stays float32)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from llm_packager.choices import ExecutionProvider, OnnxPrecision
    from llm_packager.models.onnx_build import build_onnx_model

    fp32 = workdir / "onnx_fp32"
    if not (fp32 / "genai_config.json").is_file():
        build_onnx_model(hf, fp32, precision=OnnxPrecision.fp32,
                         execution_provider=ExecutionProvider.cpu, extra_options={},
                         log_path=workdir / "onnx_fp32.log")  # fmt: skip
    config = HQQWeightOnlyQuantConfig(block_size=32, bits=4, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), algo_config=config)
    quantizer.process()
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(fp32, staging, ignore=shutil.ignore_patterns("model.onnx*"))
    quantizer.model.save_model_to_file(str(staging / "model.onnx"), use_external_data_format=True)
    staging.rename(destination)


def _smollm2_config() -> dict[str, str]:
    import yaml

    return yaml.safe_load((PROJECT_DIR / "conf" / "model" / "smollm2-135m-instruct.yaml")
                          .read_text())  # fmt: skip


def _llama_cpp_quantize(source: Path, target: Path, ftype: int) -> None:
    import ctypes

    import llama_cpp

    parameters = llama_cpp.llama_model_quantize_default_params()
    parameters.ftype = ftype
    parameters.allow_requantize = True
    parameters.nthread = 2
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                          ctypes.byref(parameters))  # fmt: skip
    if code != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to type {ftype}")


def _prompt_ids(hf: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    text = (PROJECT_DIR / "data" / "heldout_text.txt").read_text()[:PROMPT_CHARACTERS]
    chat = [{"role": "user", "content": f"Summarise this text:\n{text}"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return [int(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _onnx_decoder(folder: Path, threads: int):
    """(read the prompt and pick the first token, pick the next token) on onnxruntime-genai."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps(
        {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    ))  # fmt: skip
    model = og.Model(config)
    state = {}

    def start(ids: list[int], new_tokens: int) -> None:
        parameters = og.GeneratorParams(model)
        total = len(ids) + new_tokens
        parameters.set_search_options(max_length=total, min_length=total, do_sample=False)
        state["generator"] = generator = og.Generator(model, parameters)
        generator.append_tokens(ids)
        generator.generate_next_token()

    def step() -> None:
        state["generator"].generate_next_token()

    return start, step


def _llama_cpp_decoder(path: Path, threads: int):
    """The same two calls on llama.cpp: its eval, and the argmax of the newest logits."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # fmt: skip
    state = {}
    vocabulary = llm.n_vocab()

    def newest() -> int:
        # Without logits_all, Llama.eval keeps no scores (0.3.36): read the context's last logits.
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocabulary,))))

    def start(ids: list[int], new_tokens: int) -> None:
        llm.reset()
        llm.eval(ids)
        state["token"] = newest()

    def step() -> None:
        llm.eval([state["token"]])
        state["token"] = newest()

    return start, step


def measure_one(engine: str, path: Path, hf: Path, new_tokens: int, repeats: int,
                threads: int) -> dict[str, object]:  # fmt: skip
    """Speed and peak memory of one contender, in this process."""
    ids = _prompt_ids(hf)
    from llm_packager.evaluation.worker import peak_rss_mib

    start, step = (_onnx_decoder if engine == "onnx" else _llama_cpp_decoder)(path, threads)
    start(ids, new_tokens)  # warm-up
    first, prompt_rate, decode_rate = [], [], []
    for _ in range(repeats):
        began = time.perf_counter()
        start(ids, new_tokens)
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            step()
        ended = time.perf_counter()
        first.append(started - began)
        prompt_rate.append(len(ids) / (started - began))
        decode_rate.append((new_tokens - 1) / (ended - started))
    return {
        "prompt_tokens": len(ids),
        "time_to_first_token_s": summarise(first),
        "prompt_tokens_per_s": summarise(prompt_rate),
        "decode_tokens_per_s": summarise(decode_rate),
        "peak_rss_mib": peak_rss_mib(),
        "bytes": sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir())),
    }


def _llama_cpp_logits(path: Path, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip

    def logits(rows: list[list[int]]) -> list[np.ndarray]:
        values = []
        for row in rows:
            llm.reset()
            llm.eval(row)
            values.append(np.array(llm.scores[: len(row)], dtype=np.float32))
        return values

    return logits


def teacher_forced(contenders: dict[str, tuple[str, Path]], hf: Path, workdir: Path,
                   threads: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each contender's KL, top-1 agreement and perplexity ratio against the float32
    transformers reference, on evaluate's corpus."""
    from llm_packager.evaluation.teacher_forcing import (
        compare_with_reference,
        corpus_texts,
        onnx_logits,
        tokenize_corpus,
        torch_logits,
        write_reference,
    )

    reference = workdir / "reference"
    reference.mkdir(exist_ok=True)
    chunks = tokenize_corpus(hf, corpus_texts(PROJECT_DIR / "data" / "eval_set.jsonl"))
    write_reference(reference, torch_logits(hf), chunks, batch_size=4)
    figures = {}
    for name, (engine, path) in contenders.items():
        print(f"peers: teacher-forcing {name} ...", file=sys.stderr)
        logits = (
            onnx_logits(path, threads) if engine == "onnx" else _llama_cpp_logits(path, threads)
        )
        figures[name] = compare_with_reference(reference, logits, 1)[0].figures()
    return figures


def measure(new_tokens: int, repeats: int, threads: int, workdir: Path = WORKDIR) -> dict:
    """Every contender, each in its own process, then the teacher-forced comparison."""
    contenders = prepare(workdir)
    speeds = {}
    for name, (engine, path) in contenders.items():
        print(f"peers: timing {name} ...", file=sys.stderr)
        command = [sys.executable, "-m", "benchmarks.peers", "--one", engine, str(path),
                   "--new-tokens", str(new_tokens), "--repeats", str(repeats),
                   "--threads", str(threads), "--workdir", str(workdir)]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_DIR)
        if completed.returncode != 0:
            raise SystemExit(f"{name} failed: {completed.stderr[-2000:]}")
        speeds[name] = json.loads(completed.stdout.strip().splitlines()[-1])
    quality = teacher_forced(contenders, workdir / "hf", workdir, threads)
    return {
        "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
        "skipped": _llama_cpp_missing(),
        "contenders": {name: {**speeds[name], "teacher_forced": quality[name]}
                       for name in contenders},
    }  # fmt: skip


def markdown(figures: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct at batch 1, {figures['threads']} threads, greedy, "
        f"{figures['new_tokens']} new tokens, median (min-max) of {figures['repeats']}.",
        "",
        "| model | MB | decode tokens/s | prompt tokens/s | first token (s) | peak RSS (MiB) "
        "| KL mean | KL p99 | top-1 | ppl ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in figures["contenders"].items():
        quality = row["teacher_forced"]
        lines.append(
            f"| {name} | {row['bytes'] / 1e6:.1f} | {cell(row['decode_tokens_per_s'], 1)} "
            f"| {cell(row['prompt_tokens_per_s'], 0)} | {cell(row['time_to_first_token_s'], 3)} "
            f"| {row['peak_rss_mib']:.0f} | {quality['kld_mean']:.4f} | {quality['kld_p99']:.3f} "
            f"| {quality['top1_agreement']:.3f} | {quality['perplexity_ratio']:.4f} |"
        )
    if figures.get("skipped"):
        lines += ["", figures["skipped"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="built models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        engine, path = arguments.one
        print(json.dumps(measure_one(engine, Path(path), arguments.workdir / "hf",
                                     arguments.new_tokens, arguments.repeats,
                                     arguments.threads)))  # fmt: skip
        return
    if skipped := _llama_cpp_missing():
        print(skipped, file=sys.stderr)
    figures = measure(arguments.new_tokens, arguments.repeats, arguments.threads,
                      arguments.workdir)  # fmt: skip
    print(markdown(figures))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

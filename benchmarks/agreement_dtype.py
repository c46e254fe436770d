"""What the agreement check costs in bfloat16 against float32 on CPU: speed and memory.

log_onnx's agreement check decodes four chats greedily through transformers
(``llm_packager.models.parity.greedy_transformers``). With ``onnx.agreement_dtype=auto`` it runs in
the
dtype the weights are stored in, bfloat16 for Phi-3-mini, instead of float32. This times that
exact workload on a synthetic Phi-3 of Phi-3-mini's width (2 layers: each layer's matrices are
Phi-3-mini's, so the per-token cost of the layers is representative), in each dtype, each in a
fresh process so the peak memory (VmHWM) is its own.

Usage: ``python -m benchmarks.agreement_dtype [--layers 2] [--tokens 16] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import cell, machine_description, summarise

PHI3_MINI_WIDTH = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
}  # fmt: skip
RESULTS = Path(__file__).parent / "results" / "agreement-dtype.json"


def _one_dtype(folder: str, dtype: str, tokens: int, repeats: int) -> dict:
    """Run in a child process: time the agreement check's decoding ``repeats`` times."""
    import resource
    import time

    from llm_packager.models.parity import chat_token_ids, greedy_transformers

    prompts = chat_token_ids(Path(folder))
    seconds, generated = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = greedy_transformers(Path(folder), prompts, tokens, dtype)
        seconds.append(time.perf_counter() - started)
        generated = sum(len(output) for output in outputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "tokens": generated, "peak_rss_mib": peak}


def measure(layers: int, tokens: int, repeats: int) -> dict:
    from llm_packager.sources.synthetic import SyntheticPhi3Spec, build_synthetic_phi3

    results = {}
    with tempfile.TemporaryDirectory(prefix="agreement-dtype-") as scratch:
        spec = SyntheticPhi3Spec(**PHI3_MINI_WIDTH, num_hidden_layers=layers, seed=0,
                                 weights_dtype="bfloat16")  # fmt: skip
        folder = build_synthetic_phi3(spec, Path(scratch) / "model")
        for dtype in ("float32", "bfloat16"):
            code = (f"import json; from benchmarks.agreement_dtype import _one_dtype; "
                    f"print(json.dumps(_one_dtype({str(folder)!r}, {dtype!r}, {tokens}, "
                    f"{repeats})))")  # fmt: skip
            completed = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                       text=True, check=True)  # fmt: skip
            results[dtype] = json.loads(completed.stdout.strip().splitlines()[-1])
    return {"machine": machine_description(), "layers": layers, "tokens": tokens,
            "dtypes": results}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    figures = measure(arguments.layers, arguments.tokens, arguments.repeats)
    RESULTS.write_text(json.dumps(figures, indent=2, default=str))
    print("| agreement check in | seconds, median (min-max) | tokens | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for dtype, result in figures["dtypes"].items():
        print(f"| {dtype} | {cell(summarise(result['seconds']))} | {result['tokens']} | "
              f"{result['peak_rss_mib']:,.0f} |")  # fmt: skip

"""Evaluation throughput on local Spark (``local[1]``, ``local[2]``) against the local engine, and
Spark's fixed overhead, for one logged chat model.

    python -m benchmarks.spark --tracking-uri sqlite:///mlflow.db --model-uri models:/m-... \\
        --prompts 300 --max-tokens 16 [--output benchmarks/results/spark.json]

The prompts: the repository's evaluation set has 60, so `generated_examples` makes ``--prompts``
of them by cycling through data/eval_set.jsonl and giving each copy a numbered preamble ("Question
7 of 300."), so no two prompts are the same (no cache anywhere can answer one from another) and
their lengths stay those of the real set, within a few tokens.

What each figure is:
- ``local``: `answer_eval_set` (the local engine's worker, in this process): load, then the set
  in batches of ``--batch-size``; the answering time excludes the load.
- ``local[n]``: a new Spark session with ``n`` cores; `answer_on_spark` over ``n`` partitions,
  timed end to end (model shipped with addFile, loaded once per partition, the set answered).
- ``session_start_s``: `spark_session` from nothing to a usable session (JVM start).
- ``first_job_s``: a one-prompt job on a fresh session: the model load per Python worker plus
  Spark's per-job cost (one model load a partition, in parallel); the rest is answering.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import PROJECT_DIR, machine_description

EVAL_SET = PROJECT_DIR / "data" / "eval_set.jsonl"


def generated_examples(count: int) -> list:
    """``count`` distinct prompts made from the repository's evaluation set (module docstring)."""
    from llm_packager.evaluation.scoring import EvalExample, load_eval_set

    base = load_eval_set(EVAL_SET)
    return [
        EvalExample(
            id=f"{base[index % len(base)].id}-{index}",
            prompt=f"Question {index + 1} of {count}. {base[index % len(base)].prompt}",
            reference=base[index % len(base)].reference,
            category=base[index % len(base)].category,
            system=base[index % len(base)].system,
        )
        for index in range(count)
    ]


def _local(model_uri: str, examples: list, max_tokens: int, batch_size: int) -> dict:
    from llm_packager.evaluation.worker import answer_eval_set

    with tempfile.TemporaryDirectory(prefix="spark-bench-") as scratch:
        path = Path(scratch) / "set.jsonl"
        path.write_text("".join(json.dumps(vars(example)) + "\n" for example in examples))
        started = time.perf_counter()
        result = answer_eval_set(model_uri, path, limit=0, max_tokens=max_tokens,
                                 batch_size=batch_size, ttft_requests=0, label="local")  # fmt: skip
        total = time.perf_counter() - started
    tokens = sum(answer["completion_tokens"] for answer in result["answers"])
    answering = total - result["load_seconds"]
    return {"load_s": result["load_seconds"], "answering_s": answering, "total_s": total,
            "completion_tokens": tokens, "prompts_per_s": len(examples) / answering,
            "tokens_per_s": tokens / answering}  # fmt: skip


def _spark(model_uri: str, examples: list, max_tokens: int, batch_size: int, cores: int) -> dict:
    from llm_packager.evaluation.spark_engine import answer_on_spark, spark_session

    started = time.perf_counter()
    spark = spark_session(f"local[{cores}]")
    session_start = time.perf_counter() - started
    try:
        started = time.perf_counter()
        answer_on_spark(spark, model_uri, examples[:1], max_tokens=max_tokens, partitions=cores,
                        batch_size=batch_size)  # fmt: skip
        first_job = time.perf_counter() - started
        # A second job loads the model again in every Python worker (a new addFile name), as an
        # evaluation of one candidate does: the figure is the whole job, load included.
        started = time.perf_counter()
        result = answer_on_spark(spark, model_uri, examples, max_tokens=max_tokens,
                                 partitions=cores, batch_size=batch_size)  # fmt: skip
        total = time.perf_counter() - started
    finally:
        spark.stop()
    tokens = sum(answer["completion_tokens"] for answer in result["answers"])
    return {"session_start_s": session_start, "first_job_s": first_job, "total_s": total,
            "completion_tokens": tokens, "prompts_per_s": len(examples) / total,
            "tokens_per_s": tokens / total}  # fmt: skip


def measure(model_uri: str, prompts: int, max_tokens: int, batch_size: int,
            cores: tuple[int, ...]) -> dict:  # fmt: skip
    """Every figure of the module docstring, for one model."""
    examples = generated_examples(prompts)
    figures = {"model_uri": model_uri, "prompts": prompts, "max_tokens": max_tokens,
               "machine": machine_description(),
               "local": _local(model_uri, examples, max_tokens, batch_size)}  # fmt: skip
    for count in cores:
        figures[f"local[{count}]"] = _spark(model_uri, examples, max_tokens, batch_size, count)
    return figures


def main() -> None:
    import mlflow

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cores", default="1,2", help="local[n] sessions to time, e.g. 1,2")
    parser.add_argument("--output", type=Path)
    arguments = parser.parse_args()
    mlflow.set_tracking_uri(arguments.tracking_uri)
    figures = measure(arguments.model_uri, arguments.prompts, arguments.max_tokens,
                      arguments.batch_size,
                      tuple(int(count) for count in arguments.cores.split(",")))  # fmt: skip
    text = json.dumps(figures, indent=2)
    print(text)
    if arguments.output:
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Answer an evaluation set with one logged model, in a process of its own.

Run by the evaluate step as ``python -m llm_packager.evaluation.worker``: a separate process per
model
means each model's peak memory is its own, and the model is loaded by its URI through
``mlflow.pyfunc`` exactly as a server would load it. Writes one JSON file of answers and figures.

Given ``--teacher-forced-dir``, it then reads the teacher-forced corpus through the same logged
model's weights on its own runtime (``llm_packager.evaluation.teacher_forcing``): the reference
candidate (``--teacher-forced-reference``) tokenizes the corpus and leaves its log-probabilities
there, every other candidate compares its own with them. This runs after the memory figures are
taken, so they stay the served model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from llm_packager.evaluation.scoring import load_eval_set
from llm_packager.evaluation.teacher_forcing import (
    KL_DIVERGENCES,
    TEACHER_FORCED_SKIPPED,
    TeacherForcingError,
    compare_with_reference,
    corpus_texts,
    logged_model_logits,
    tokenize_corpus,
    write_reference,
)
from llm_packager.keys import (
    LOAD_SECONDS_METRIC,
    MODEL_SIZE_BYTES_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
    PEAK_RSS_LOAD_MIB_METRIC,
    TTFT_S_METRIC,
)
from llm_packager.models.chat import load_logged_model
from llm_packager.third_party import silence_known_warnings


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _answer_text(completion: dict) -> str:
    return completion["choices"][0]["message"]["content"]


def answer_eval_set(
    model_uri: str, eval_set: Path, *, limit: int, max_tokens: int, batch_size: int,
    ttft_requests: int, label: str, teacher_forced_dir: Path | None = None,
    teacher_forced_reference: bool = False,
) -> dict:  # fmt: skip
    """Load the model, time a few 1-token requests (time to first token), then answer every
    example greedily in batches; return answers, latencies and memory figures, and given
    ``teacher_forced_dir`` the teacher-forced figures (`teacher_forced`)."""
    examples = load_eval_set(eval_set, limit)
    with tempfile.TemporaryDirectory(prefix="eval-model-") as scratch:
        loaded = load_logged_model(model_uri, Path(scratch))
        model, size, load_seconds = loaded.model, loaded.size_bytes, loaded.load_seconds
        rss_after_load = peak_rss_mib()
        first_token = []
        for example in examples[:ttft_requests]:
            started = time.perf_counter()
            model.predict(example.chat_request(1))
            first_token.append(time.perf_counter() - started)
        answers = []
        progress = tqdm(total=len(examples), desc=f"answering ({label})", unit="prompt")
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            started = time.perf_counter()
            completions = model.predict([example.chat_request(max_tokens) for example in batch])
            latency = time.perf_counter() - started
            for example, completion in zip(batch, completions, strict=True):
                answers.append(
                    {
                        "id": example.id,
                        "answer": _answer_text(completion),
                        "completion_tokens": completion["usage"]["completion_tokens"],
                        "finish_reason": completion["choices"][0]["finish_reason"],
                        "latency_s": latency,
                    }
                )
            progress.update(len(batch))
        progress.close()
        result = {
            "model_uri": model_uri,
            MODEL_SIZE_BYTES_METRIC: size,
            LOAD_SECONDS_METRIC: load_seconds,
            PEAK_RSS_LOAD_MIB_METRIC: rss_after_load,
            PEAK_RSS_GENERATE_MIB_METRIC: peak_rss_mib(),
            TTFT_S_METRIC: statistics.median(first_token) if first_token else None,
            "answers": answers,
        }
        if teacher_forced_dir is not None:
            del model, loaded  # the served model is done with; its memory may be reused
            result |= teacher_forced(
                Path(scratch), teacher_forced_dir, reference=teacher_forced_reference,
                eval_set=eval_set, batch_size=batch_size,
            )  # fmt: skip
    return result


def teacher_forced(local_model: Path, folder: Path, *, reference: bool, eval_set: Path,
                   batch_size: int) -> dict:  # fmt: skip
    """The downloaded model under ``local_model`` read teacher-forced: as the reference (writes
    the corpus and its log-probabilities into ``folder``) or compared with the reference there.

    Returns the figures by metric name (`TEACHER_FORCED_METRICS`) and every position's KL
    divergence (`KL_DIVERGENCES`), or only `TEACHER_FORCED_SKIPPED` with the reason: a model that
    cannot be compared is not a failure, its answers are still evaluated.
    """
    try:
        logits, tokenizer = logged_model_logits(local_model)
        if reference:
            chunks = tokenize_corpus(tokenizer, corpus_texts(eval_set))
            comparison = write_reference(folder, logits, chunks, batch_size)
        else:
            comparison, _ = compare_with_reference(folder, logits, batch_size)
    except TeacherForcingError as error:
        return {TEACHER_FORCED_SKIPPED: str(error)}
    except Exception as error:
        # The candidate's answers are already measured; a comparison that cannot run on its
        # graph (another input layout, a cache type, an execution provider) is a note naming the
        # error, never the candidate's failure.
        return {TEACHER_FORCED_SKIPPED: f"{type(error).__name__}: {error}"}
    return comparison.figures() | {KL_DIVERGENCES: comparison.kl_divergences.tolist()}


def main() -> None:
    silence_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--eval-set", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ttft-requests", type=int, default=5)
    parser.add_argument("--label", default="model")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--teacher-forced-dir", type=Path, default=None)
    parser.add_argument("--teacher-forced-reference", action="store_true")
    arguments = parser.parse_args()
    result = answer_eval_set(
        arguments.model_uri, arguments.eval_set, limit=arguments.limit,
        max_tokens=arguments.max_tokens, batch_size=arguments.batch_size,
        ttft_requests=arguments.ttft_requests, label=arguments.label,
        teacher_forced_dir=arguments.teacher_forced_dir,
        teacher_forced_reference=arguments.teacher_forced_reference,
    )  # fmt: skip
    arguments.output.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

"""Teacher-forced comparison: every position's next-token distribution against the reference's.

A fixed token corpus (the evaluation set's reference answers and the held-out text
``data/heldout_text.txt``, tokenized once with the reference candidate's tokenizer) is read by
each candidate in one forward pass per chunk, with no generation. At every position the
candidate's next-token distribution Q is compared with the reference's P, as llama.cpp's
``llama-perplexity --kl-divergence`` does: the KL divergence KL(P‖Q) = sum of P * (log P - log Q) in
nats (reference first, as llama.cpp's KL(base‖quantized)), whether the two most likely tokens
agree, and the candidate's perplexity on the corpus beside the reference's. Unlike 48 generated
answers, this sees every quantization error that moves the distribution, whether or not it
changes a greedy answer.

The reference worker writes its log-probabilities (fp32, positions x vocabulary) to a file that
each candidate's worker reads back, so every candidate runs in its own process on its own
runtime: transformers through torch (float32), ONNX through onnxruntime on the build's
``model.onnx``, whose graph returns the logits of every position of the tokens it is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_packager.errors import UserError
from llm_packager.evaluation.scoring import load_eval_set
from llm_packager.keys import (
    KLD_MEAN_METRIC,
    KLD_P95_METRIC,
    KLD_P99_METRIC,
    PERPLEXITY_METRIC,
    PERPLEXITY_RATIO_METRIC,
    TOP1_AGREEMENT_METRIC,
)
from llm_packager.project import PROJECT_DIR

HELD_OUT_TEXT = PROJECT_DIR / "data" / "heldout_text.txt"
# Tokens per chunk: each chunk is one row of a forward pass, its first token read with no context.
CHUNK_TOKENS = 256
TOKENS_FILE = "tokens.json"
REFERENCE_LOG_PROBS_FILE = "reference_log_probs.npy"
# Fields of a worker's output besides the figures: every position's KL divergence, for the
# report's histogram (not a metric), and why a candidate was not compared.
KL_DIVERGENCES = "kl_divergences"
TEACHER_FORCED_SKIPPED = "teacher_forced_skipped"

# A batch of token rows (each a chunk) -> each row's logits, shape (len(row), vocabulary).
LogitsFunction = Callable[[list[list[int]]], list[np.ndarray]]


class TeacherForcingError(UserError, ValueError):
    """A candidate whose next-token distributions cannot be compared with the reference's."""


def corpus_texts(eval_set: Path, held_out: Path = HELD_OUT_TEXT) -> list[str]:
    """The corpus as documents: the evaluation set's reference answers (one per line), then the
    held-out text."""
    answers = "\n".join(example.reference for example in load_eval_set(eval_set))
    return [answers, held_out.read_text(encoding="utf-8").strip()]


def tokenize_corpus(tokenizer_folder: Path, texts: list[str],
                    chunk_tokens: int = CHUNK_TOKENS) -> list[list[int]]:  # fmt: skip
    """Each document's token ids cut into chunks of at most ``chunk_tokens`` (a chunk of one
    token predicts nothing, so it is dropped)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    chunks = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        chunks += [ids[start : start + chunk_tokens] for start in range(0, len(ids), chunk_tokens)]
    return [chunk for chunk in chunks if len(chunk) > 1]


def torch_logits(hf_folder: Path) -> LogitsFunction:
    """Logits from the transformers model in the dtype it was logged in, as the reference
    candidate serves it. Not float32 whatever it was: Phi-3-mini logged in bfloat16 would be read
    again in 15.3 GB instead of 7.6, past the 16 GB the default pipeline fits. The logits are
    compared in float32 either way."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype="auto").eval()

    def logits(rows: list[list[int]]) -> list[np.ndarray]:
        ids, mask = _right_padded(rows, np.int64)
        with torch.inference_mode():
            output = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        values = output.logits.float().numpy()
        return [values[row, : len(tokens)] for row, tokens in enumerate(rows)]

    return logits


def onnx_logits(onnx_folder: Path, threads: int = 0) -> LogitsFunction:
    """Logits from an onnxruntime-genai build's decoder graph, run by onnxruntime on the CPU with
    an empty key/value cache: the graph returns the logits of every token it is given. ``threads``
    0 takes the served model's default (`usable_cores`)."""
    import onnxruntime as ort

    from llm_packager.serving.decode_loop import usable_cores

    decoder = json.loads((onnx_folder / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    session = ort.InferenceSession(str(onnx_folder / decoder["filename"]), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    inputs = {node.name: node.type for node in session.get_inputs()}
    ids_type = np.int32 if inputs["input_ids"] == "tensor(int32)" else np.int64
    cache = [name for name in inputs if name.startswith("past_key_values.")]
    cache_types = {"tensor(float16)": np.float16, "tensor(float)": np.float32}
    if inputs[cache[0]] not in cache_types:  # bfloat16 has no numpy type to feed it with
        raise TeacherForcingError(
            f"the build's cache is {inputs[cache[0]]}; the comparison reads float16 and float32"
        )
    cache_type = cache_types[inputs[cache[0]]]
    heads, head_size = int(decoder["num_key_value_heads"]), int(decoder["head_size"])

    def logits(rows: list[list[int]]) -> list[np.ndarray]:
        ids, mask = _right_padded(rows, ids_type)
        empty = np.zeros((len(rows), heads, 0, head_size), cache_type)
        feed = {"input_ids": ids, "attention_mask": mask, **dict.fromkeys(cache, empty)}
        (values,) = session.run(["logits"], feed)
        values = values.astype(np.float32)
        return [values[row, : len(tokens)] for row, tokens in enumerate(rows)]

    return logits


def _right_padded(rows: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    # Padded on the right: attention is causal, so a row's real tokens never see its padding.
    ids = np.zeros((len(rows), max(map(len, rows))), dtype=dtype)
    mask = np.zeros(ids.shape, dtype=np.int64)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    return ids, mask


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def next_token_log_probs(logits: LogitsFunction, chunks: list[list[int]],
                         batch_size: int) -> Iterator[np.ndarray]:  # fmt: skip
    """Each chunk's next-token log-probabilities (float64) at every position that has a next
    token, shape (len(chunk) - 1, vocabulary), in chunk order, ``batch_size`` chunks a pass."""
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        for tokens, values in zip(batch, logits(batch), strict=True):
            yield _log_softmax(values[: len(tokens) - 1])


def positions(chunks: list[list[int]]) -> int:
    """How many next tokens the chunks predict (each chunk's first token has no prediction)."""
    return sum(len(chunk) - 1 for chunk in chunks)


@dataclass(frozen=True)
class Comparison:
    """Per-position comparison of a candidate with the reference over the corpus."""

    kl_divergences: np.ndarray  # KL(reference ‖ candidate) in nats
    top1_matches: np.ndarray  # whether the two most likely next tokens are the same
    candidate_nll: np.ndarray  # -log Q(actual next token)
    reference_nll: np.ndarray  # -log P(actual next token)

    def figures(self) -> dict[str, float]:
        """Mean, p95 and p99 KL, top-1 agreement, perplexity and its ratio to the reference's."""
        perplexity = math.exp(float(self.candidate_nll.mean()))
        reference = math.exp(float(self.reference_nll.mean()))
        return {
            KLD_MEAN_METRIC: float(self.kl_divergences.mean()),
            KLD_P95_METRIC: float(np.percentile(self.kl_divergences, 95)),
            KLD_P99_METRIC: float(np.percentile(self.kl_divergences, 99)),
            TOP1_AGREEMENT_METRIC: float(self.top1_matches.mean()),
            PERPLEXITY_METRIC: perplexity,
            PERPLEXITY_RATIO_METRIC: perplexity / reference,
        }


def compare(reference: np.ndarray, candidate: Iterator[np.ndarray],
            chunks: list[list[int]]) -> Comparison:  # fmt: skip
    """Compare a candidate's log-probabilities, chunk by chunk as `next_token_log_probs` gives
    them, with the reference's (positions x vocabulary, the chunks' positions in order).

    Raises:
        TeacherForcingError: the candidate's vocabulary is not the reference's.
    """
    kl, top1, candidate_nll, reference_nll = [], [], [], []
    row = 0
    for tokens, log_q in zip(chunks, candidate, strict=True):
        log_p = np.asarray(reference[row : row + len(log_q)], dtype=np.float64)
        if log_q.shape != log_p.shape:
            raise TeacherForcingError(
                f"the candidate predicts over {log_q.shape[-1]} tokens, the reference over "
                f"{log_p.shape[-1]}: their vocabularies differ, so their distributions cannot "
                "be compared"
            )
        # Rounding can leave a position's sum a hair below zero; a divergence is never negative.
        kl.append(np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0))
        top1.append(log_p.argmax(axis=-1) == log_q.argmax(axis=-1))
        following = np.asarray(tokens[1:])
        candidate_nll.append(-log_q[np.arange(len(following)), following])
        reference_nll.append(-log_p[np.arange(len(following)), following])
        row += len(log_q)
    return Comparison(*(np.concatenate(parts) for parts in (kl, top1, candidate_nll,
                                                            reference_nll)))  # fmt: skip


def write_reference(folder: Path, logits: LogitsFunction, chunks: list[list[int]],
                    batch_size: int) -> Comparison:  # fmt: skip
    """Write the corpus and the reference's log-probabilities (float32) into ``folder`` for the
    candidates' workers, and return the reference's own figures: the stored log-probabilities
    against themselves (KL 0 and top-1 agreement 1 by definition; its perplexity), with no
    second forward pass."""
    (folder / TOKENS_FILE).write_text(json.dumps(chunks))
    stored = None
    row = 0
    for log_p in next_token_log_probs(logits, chunks, batch_size):
        if stored is None:
            shape = (positions(chunks), log_p.shape[-1])
            stored = np.lib.format.open_memmap(
                folder / REFERENCE_LOG_PROBS_FILE, mode="w+", dtype=np.float32, shape=shape
            )
        stored[row : row + len(log_p)] = log_p
        row += len(log_p)
    stored.flush()
    reference = np.load(folder / REFERENCE_LOG_PROBS_FILE, mmap_mode="r")
    return compare(reference, _stored_chunks(reference, chunks), chunks)


def _stored_chunks(stored: np.ndarray, chunks: list[list[int]]) -> Iterator[np.ndarray]:
    row = 0
    for chunk in chunks:
        yield np.asarray(stored[row : row + len(chunk) - 1], dtype=np.float64)
        row += len(chunk) - 1


def compare_with_reference(folder: Path, logits: LogitsFunction,
                           batch_size: int) -> tuple[Comparison, list[list[int]]]:  # fmt: skip
    """A candidate compared with the reference `write_reference` left in ``folder``, and the
    corpus it was compared on.

    Raises:
        TeacherForcingError: the reference left nothing in ``folder`` (it could not be read
            teacher-forced), or the vocabularies differ.
    """
    if not (folder / REFERENCE_LOG_PROBS_FILE).is_file():
        raise TeacherForcingError("the reference candidate left no log-probabilities to compare "
                                  "with")  # fmt: skip
    chunks = json.loads((folder / TOKENS_FILE).read_text())
    reference = np.load(folder / REFERENCE_LOG_PROBS_FILE, mmap_mode="r")
    return compare(reference, next_token_log_probs(logits, chunks, batch_size), chunks), chunks


def logged_model_logits(local: Path, threads: int = 0) -> tuple[LogitsFunction, Path]:
    """The logits function of a downloaded logged model, by what it holds, and the folder of its
    tokenizer: an onnxruntime-genai build (its ``genai_config.json``) runs on onnxruntime, a
    transformers model (its ``model/`` weights, ``components/tokenizer``) on torch.

    Raises:
        TeacherForcingError: neither, e.g. a transformers model logged without its weights
            (``transformers.save_pretrained=false``).
    """
    builds = sorted(local.rglob("genai_config.json"))
    if builds:
        return onnx_logits(builds[0].parent, threads), builds[0].parent
    # mlflow.transformers stores the weights in model/ and the tokenizer in components/tokenizer,
    # beside the MLmodel file (a run-artifact model lies a folder deeper than a LoggedModel).
    root = min((path.parent for path in local.rglob("MLmodel")), default=local,
               key=lambda folder: len(folder.parts))  # fmt: skip
    weights, tokenizer = root / "model", root / "components" / "tokenizer"
    if (weights / "config.json").is_file() and tokenizer.is_dir():
        return torch_logits(weights), tokenizer
    raise TeacherForcingError(
        f"the logged model at {local} holds neither an ONNX build nor transformers weights "
        "(a transformers model logged with save_pretrained=false keeps no weights)"
    )

"""An OpenAI-compatible chat model over onnxruntime-genai, logged to MLflow as code.

This file is the model: ``mlflow.pyfunc.log_model(python_model=<this file>)`` stores it as source
and ``set_model`` at the bottom names the instance, so loading never unpickles code. It imports
only what the served model's requirements install (onnxruntime-genai, numpy, pandas, mlflow), not
the rest of this project.

Two request shapes are served:

- an OpenAI chat request (``messages`` plus optional ``max_tokens``, ``temperature``, ``top_p``,
  ``stop``, ``n``), answered with an OpenAI chat completion, as the transformers model does;
- the reference sample's ``{"prompt": "<already templated text>"}``, answered with plain text.

Every row of a batch is answered, and ``predict_stream`` streams one chat request as OpenAI
``chat.completion.chunk`` dicts.

All generation runs on one decode loop per loaded model, a thread that owns every decoder call.
MLflow's scoring server calls ``predict`` from a thread pool, so concurrent requests reach one
instance at once, and on a CPU a step of several sequences costs far less than a step of each.
On CPU builds of the model builder's decoder the loop decodes every sequence in one batch that
sequences join and leave at every step (``_SharedRows``: continuous batching on a key/value cache
this model owns, up to ``max_batch_size`` rows): a request that arrives mid-generation has its
prompt read between two steps and decodes with the others from the next one, and an answer is
handed back, and its row given up, the step it finishes, so a short answer never waits for a long
one. An onnxruntime-genai ``Generator`` fixes its batch when it starts, and onnxruntime-genai's own
``Engine`` refills a batch only on CUDA (its continuous batching needs a paged-attention build,
which the builder makes for CUDA only), so on CPU this is ours. Other builds, and
``batching: generators``, decode with Generators: requests arriving a few milliseconds apart are
gathered into one batch (for at most ``batch_wait_ms``, or until a full batch waits), later ones
start a new batch beside it, every live batch advances a token per round, and at most
``2 * max_batch_size`` sequences are held. At most ``max_queued_requests`` requests wait; past
that the server answers 503.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

ONNX_ARTIFACT_KEY = "onnx_model"
ROLES = ("system", "user", "assistant")
MAX_CHOICES = 8
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_QUEUED_REQUESTS = 64
DEFAULT_BATCH_WAIT_MS = 20
LONE_CLIENT_SECONDS = 1.0

_logger = logging.getLogger(__name__)


class BadRequestError(MlflowException):
    """A request the model refuses; the scoring server answers it with HTTP 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class BusyError(MlflowException):
    """The decode loop's queue is full; the scoring server answers it with HTTP 503."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=TEMPORARILY_UNAVAILABLE)


def _present(value: Any) -> bool:
    # Columns missing from some rows of a DataFrame arrive as None or NaN.
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _rows(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        return [
            {key: value for key, value in row.items() if _present(value)}
            for row in model_input.to_dict(orient="records")
        ]
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        return model_input
    raise BadRequestError(
        "Expected a chat request {'messages': [...]}, a prompt request {'prompt': '...'}, "
        f"or a list of them; got {type(model_input).__name__}"
    )


def _messages(raw: Any) -> list[dict[str, str]]:
    if isinstance(raw, str) or not hasattr(raw, "__iter__"):
        raise BadRequestError("'messages' must be a list of {role, content} objects")
    messages = list(raw)
    if not messages:
        raise BadRequestError("'messages' must not be empty")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequestError(f"messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRequestError(
                f"messages[{index}].role must be one of {', '.join(ROLES)}; got {role!r}"
            )
        if not isinstance(content, str):
            raise BadRequestError(
                f"messages[{index}].content must be a string; got {type(content).__name__}"
            )
        checked.append({"role": role, "content": content})
    return checked


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _stop_strings(raw: Any) -> list[str]:
    if not _present(raw):
        return []
    stops = [raw] if isinstance(raw, str) else list(raw)
    if not all(isinstance(stop, str) and stop for stop in stops):
        raise BadRequestError("'stop' must be a non-empty string or a list of them")
    return stops


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could still grow into a stop string; a stream
    holds them back so that a stop string never leaks out."""
    return max(
        (size for stop in stops for size in range(min(len(stop) - 1, len(text)), 0, -1)
         if text.endswith(stop[:size])),
        default=0,
    )  # fmt: skip


class _Sequence:
    """One answer being generated: a prompt, its options, and where its text goes.

    ``report(index, event, value)`` receives, if ``streaming``, ``("delta", text)`` as text
    becomes safe to show; then ``("done", (text, tokens, finish_reason))`` or
    ``("error", exception)``. (Without streaming, the requester is not woken for every token.)
    """

    def __init__(self, index: int, ids: list[int], options: dict[str, Any],
                 report: Callable[[int, str, Any], None], owner: object,
                 streaming: bool) -> None:  # fmt: skip
        self.index, self.ids, self.options, self.report = index, ids, options, report
        self.owner, self.streaming = owner, streaming
        self.text, self.shown, self.produced = "", 0, 0
        self.finished: str | None = None
        self.cancelled = False
        self.stream = None

    def search_key(self) -> tuple:
        """Sequences batched together must share this. A seed seeds the whole batch, so a seeded
        request is batched only with itself: its samples stay what it gets alone."""
        options = self.options
        owner = id(self.owner) if options["sampling"] and options["seed"] is not None else None
        return options["sampling"], options["temperature"], options["top_p"], options["seed"], owner

    def take(self, token: int, end_tokens: set[int]) -> None:
        """Add one generated token; report new safe text, and the answer once it is finished."""
        if token in end_tokens:
            self._finish("stop")
            return
        self.produced += 1
        self.text += self.stream.decode(token)
        stops = self.options["stop"]
        cut = min((self.text.find(stop) for stop in stops if stop in self.text), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._finish("stop")
        elif self.produced == self.options["max_tokens"]:
            self._finish("length")
        elif self.streaming:
            safe = len(self.text) - _held_back(self.text, stops)
            if safe > self.shown:
                self.report(self.index, "delta", self.text[self.shown : safe])
                self.shown = safe

    def end_early(self) -> None:
        """The generator stopped (max length reached) before this sequence chose to."""
        if self.finished is None:
            self._finish("length" if self.produced >= self.options["max_tokens"] else "stop")

    def fail(self, error: BaseException) -> None:
        if self.finished is None:
            self.finished = "error"
            self.report(self.index, "error", error)

    def _finish(self, reason: str) -> None:
        self.finished = reason
        if self.streaming and len(self.text) > self.shown:
            self.report(self.index, "delta", self.text[self.shown :])
            self.shown = len(self.text)
        self.report(self.index, "done", (self.text, self.produced, reason))


class _Batch:
    """Sequences decoded together by one onnxruntime-genai Generator."""

    def __init__(self, model, tokenizer, pad_token: int, sequences: list[_Sequence]) -> None:
        self.sequences = sequences
        options = sequences[0].options
        longest = max(len(sequence.ids) for sequence in sequences)
        search: dict[str, Any] = {
            "max_length": longest + max(sequence.options["max_tokens"] for sequence in sequences),
            "do_sample": options["sampling"],
            "batch_size": len(sequences),
        }
        if options["sampling"]:
            search |= {"temperature": options["temperature"], "top_p": options["top_p"]}
            if options["seed"] is not None:
                search["random_seed"] = options["seed"]
        generator_params = og.GeneratorParams(model)
        generator_params.set_search_options(**search)
        self.generator = og.Generator(model, generator_params)
        # Padded on the right with the pad token, as Tokenizer.encode_batch does; onnxruntime-genai
        # masks pad positions, so each answer equals the one the prompt gets alone.
        prompts = np.full((len(sequences), longest), pad_token, dtype=np.int32)
        for row, sequence in enumerate(sequences):
            prompts[row, : len(sequence.ids)] = sequence.ids
            sequence.stream = tokenizer.create_stream()
        self.generator.append_tokens(prompts)

    def live(self) -> bool:
        return any(sequence.finished is None and not sequence.cancelled
                   for sequence in self.sequences)  # fmt: skip

    def step(self, end_tokens: set[int]) -> None:
        if self.generator.is_done():
            for sequence in self.sequences:
                sequence.end_early()
            return
        self.generator.generate_next_token()
        for sequence, token in zip(self.sequences, self.generator.get_next_tokens(), strict=True):
            if sequence.finished is None and not sequence.cancelled:
                sequence.take(int(token), end_tokens)


class _SharedRows:
    """Continuous batching on CPU: every sequence decoded in one batch whose rows come and go.

    An onnxruntime-genai Generator fixes its batch when it starts. Here the key/value cache is
    ours: one array per layer with a row per sequence, bound as both past and present, which is
    how the builder's GroupQueryAttention graphs share one buffer (each row's length comes from
    its attention mask, and a step writes each row's new entry at that row's own length). A new
    sequence is read in (prefill) into the next free row between two steps, and the step a
    sequence finishes, the last row moves into its place. Rows are kept contiguous, so a step
    binds the first ``len(sequences)`` rows of each array without copying.
    """

    def __init__(self, session, tokenizer, genai_config: dict[str, Any]) -> None:
        decoder = genai_config["model"]["decoder"]
        self._session, self._tokenizer = session, tokenizer
        self._layers = int(decoder["num_hidden_layers"])
        self._row_shape = (int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
        inputs = {node.name: node.type for node in session.get_inputs()}
        self._cache_dtype = (
            np.float16 if "float16" in inputs["past_key_values.0.key"] else np.float32
        )
        self._ids_dtype = np.int32 if inputs["input_ids"] == "tensor(int32)" else np.int64
        self._context_length = int(genai_config["model"]["context_length"])
        self._top_k = int(genai_config.get("search", {}).get("top_k", 0))
        self.sequences: list[_Sequence] = []
        self._lengths: list[int] = []  # tokens whose keys and values are in each row
        self._last: list[int] = []  # each row's newest token, not yet in the cache
        self._cache: list[np.ndarray] = []  # past_key_values.<layer>.key, .value, ...
        # A step binds the same rows as the step before unless a row came or went or the cache
        # was replaced, so its binding is kept: (cache generation, rows) and the binding.
        self._generation = 0
        self._step_binding: tuple[tuple[int, int], Any] | None = None

    @classmethod
    def open(
        cls, folder: Path, genai_config: dict[str, Any], tokenizer, threads: int
    ) -> _SharedRows | None:
        """Rows over this build, or None (then onnxruntime-genai's Generators decode it) where it
        is not a CPU build whose only inputs are the token ids, the attention mask and the cache,
        or where the cache cannot be shared by past and present (a probe decode says so)."""
        import onnxruntime as ort

        decoder = genai_config["model"].get("decoder", {})
        if decoder.get("session_options", {}).get("provider_options"):
            return None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            str(folder / decoder["filename"]), options, providers=["CPUExecutionProvider"]
        )
        cache = [f"{layer}.{kind}" for layer in range(int(decoder["num_hidden_layers"]))
                 for kind in ("key", "value")]  # fmt: skip
        inputs = {node.name for node in session.get_inputs()}
        outputs = {node.name for node in session.get_outputs()}
        if inputs != {"input_ids", "attention_mask", *(f"past_key_values.{n}" for n in cache)}:
            return None
        if outputs != {"logits", *(f"present.{name}" for name in cache)}:
            return None
        rows = cls(session, tokenizer, genai_config)
        try:
            rows._probe()
        except Exception as error:  # e.g. an attention whose present outgrows its past
            _logger.warning("Decoding with onnxruntime-genai Generators: %s", error)
            return None
        return rows

    def _probe(self) -> None:
        """Read two tokens into one row, then decode one: the shapes a shared cache needs."""
        self._reserve(1, 3)
        rows = [array[:1] for array in self._cache]
        prompt = self._run(rows, np.zeros((1, 2), self._ids_dtype), np.ones((1, 2), np.int64))
        step = self._run(rows, np.zeros((1, 1), self._ids_dtype), np.ones((1, 3), np.int64))
        self._replace_cache([])
        if prompt.shape[:2] != (1, 2) or step.shape[:2] != (1, 1):
            raise ValueError(f"unexpected logits shapes {prompt.shape} and {step.shape}")

    def live(self) -> bool:
        return bool(self.sequences)

    def add(self, sequences: list[_Sequence], end_tokens: set[int]) -> None:
        """Read the prompts into new rows, together, and take each one's first generated token."""
        first, lengths = len(self.sequences), [len(sequence.ids) for sequence in sequences]
        self._reserve(first + len(sequences), max(
            length + sequence.options["max_tokens"]
            for length, sequence in zip(lengths, sequences, strict=True)))  # fmt: skip
        # Padded on the right; the mask gives each row its own length, so the pad is never read.
        ids = np.zeros((len(sequences), max(lengths)), dtype=self._ids_dtype)
        mask = np.zeros(ids.shape, dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, : lengths[row]], mask[row, : lengths[row]] = sequence.ids, 1
        # Read into a cache just as long as the prompts, then copied into the rows: attention over
        # a prompt costs in proportion to its buffer's length, not the prompt's (on the benchmark
        # proxy a 14-token prompt took 20 ms with a 96-token buffer, 55 ms with a 2048-token one).
        shape = (len(sequences), self._row_shape[0], ids.shape[1], self._row_shape[1])
        prompt_cache = [np.zeros(shape, self._cache_dtype) for _ in self._cache]
        logits = self._run(prompt_cache, ids, mask)
        for array, prompts in zip(self._cache, prompt_cache, strict=True):
            for row, length in enumerate(lengths):
                array[first + row, :, :length] = prompts[row, :, :length]
        for row, sequence in enumerate(sequences):
            seed = sequence.options["seed"]
            sequence.rng = np.random.default_rng(None if seed is None else [seed, sequence.index])
            sequence.stream = self._tokenizer.create_stream()
            self.sequences.append(sequence)
            self._lengths.append(lengths[row])
            self._last.append(self._choose(logits[row, lengths[row] - 1], sequence))
            sequence.take(self._last[-1], end_tokens)
        self._drop_finished()

    def step(self, end_tokens: set[int]) -> None:
        count = len(self.sequences)
        mask = np.zeros((count, max(self._lengths) + 1), dtype=np.int64)
        for row, length in enumerate(self._lengths):
            mask[row, : length + 1] = 1
        ids = np.array(self._last, dtype=self._ids_dtype).reshape(count, 1)
        key = (self._generation, count)
        if self._step_binding is None or self._step_binding[0] != key:
            self._step_binding = (key, self._bind([array[:count] for array in self._cache]))
        logits = self._execute(self._step_binding[1], ids, mask)
        for row, sequence in enumerate(self.sequences):
            self._lengths[row] += 1
            self._last[row] = self._choose(logits[row, -1], sequence)
            if sequence.finished is None and not sequence.cancelled:
                sequence.take(self._last[row], end_tokens)
        self._drop_finished()

    def fail_all(self) -> list[_Sequence]:
        """Give up every row (a step failed): the sequences it held, for the caller to fail."""
        held, self.sequences, self._lengths, self._last = self.sequences, [], [], []
        self._replace_cache([])
        return held

    def _choose(self, logits: np.ndarray, sequence: _Sequence) -> int:
        options = sequence.options
        if not options["sampling"]:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / options["temperature"]
        # The build's top_k (its genai_config's search options), then nucleus (top_p) sampling.
        keep = min(self._top_k or scaled.size, scaled.size)
        candidates = np.argpartition(-scaled, keep - 1)[:keep]
        candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
        weights = np.exp(scaled[candidates] - scaled[candidates[0]])
        cumulative = np.cumsum(weights) / weights.sum()
        kept = min(int(np.searchsorted(cumulative, options["top_p"])) + 1, len(weights))
        weights = weights[:kept]
        return int(candidates[sequence.rng.choice(kept, p=weights / weights.sum())])

    def _drop_finished(self) -> None:
        for row in range(len(self.sequences) - 1, -1, -1):
            sequence = self.sequences[row]
            if sequence.finished is None and not sequence.cancelled:
                continue
            last = len(self.sequences) - 1
            if row != last:
                for array in self._cache:
                    array[row] = array[last]
                self.sequences[row] = self.sequences[last]
                self._lengths[row], self._last[row] = self._lengths[last], self._last[last]
            del self.sequences[last], self._lengths[last], self._last[last]
        if not self.sequences:
            self._replace_cache([])  # nothing held while idle

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the cache to hold ``rows`` rows of ``length`` tokens, keeping what it holds."""
        have_rows, have_length = self._cache[0].shape[::2] if self._cache else (0, 0)
        if rows <= have_rows and length <= have_length:
            return
        # Rounded up, so a burst of arrivals does not copy the cache at every one; no spare rows
        # for a lone request, whose cache is zeroed afresh each time (8 rows cost 5 ms a request).
        new_rows = max(rows, 2 * have_rows)
        new_length = min(max(length, have_length, -(-length // 256) * 256), self._context_length)
        heads, head_size = self._row_shape
        grown = []
        for index in range(2 * self._layers):
            array = np.zeros((new_rows, heads, new_length, head_size), dtype=self._cache_dtype)
            if self._cache:
                array[: len(self.sequences), :, :have_length] = self._cache[index][
                    : len(self.sequences)
                ]
            grown.append(array)
        self._replace_cache(grown)

    def _replace_cache(self, arrays: list[np.ndarray]) -> None:
        self._cache, self._generation, self._step_binding = arrays, self._generation + 1, None

    def _run(self, cache: list[np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One forward pass over ``cache`` (contiguous arrays, each bound as past and present)."""
        return self._execute(self._bind(cache), ids, mask)

    def _bind(self, cache: list[np.ndarray]):
        """An io_binding of ``cache`` as past and present, and of the logits (first, so the
        binding's first output; onnxruntime allocates them at every run)."""
        import onnxruntime as ort

        binding = self._session.io_binding()
        binding.bind_output("logits")
        for index, array in enumerate(cache):
            layer, kind = divmod(index, 2)
            suffix = f"{layer}.{('key', 'value')[kind]}"
            rows = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(f"past_key_values.{suffix}", rows)
            binding.bind_ortvalue_output(f"present.{suffix}", rows)
        return binding

    def _execute(self, binding, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        self._session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


class _DecodeLoop:
    """The one thread that generates for every request to a loaded model (see the module's
    docstring for why)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        end_tokens: set[int],
        pad_token: int,
        context_length: int,
        max_batch_size: int,
        max_queued_requests: int,
        gather_seconds: float,
        rows: _SharedRows | None = None,
    ) -> None:
        self._model, self._tokenizer, self._rows = model, tokenizer, rows
        self._end_tokens, self._pad_token = end_tokens, pad_token
        self._context_length = context_length
        self._max_batch_size = max_batch_size
        # Generators: a batch cannot grow, so room is kept for a second one to start beside it.
        self._max_held = max_batch_size if rows else 2 * max_batch_size
        self._max_queued_requests = max_queued_requests
        self._gather_seconds = gather_seconds
        self._changed = threading.Condition()
        self._waiting: deque[tuple[float, list[_Sequence]]] = deque()
        self._batches: list[_Batch] = []
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self._last_concurrent = -math.inf

    def submit(self, sequences: list[_Sequence]) -> None:
        """Queue one request's sequences; the caller calls ``release`` with them when done."""
        with self._changed:
            if len(self._waiting) >= self._max_queued_requests:
                raise BusyError(
                    f"The model is busy: {len(self._waiting)} requests are already waiting "
                    f"(max_queued_requests). Retry shortly."
                )
            self._in_flight += 1
            if self._in_flight > 1:
                self._last_concurrent = time.monotonic()
            self._waiting.append((time.monotonic(), sequences))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="onnx-decode-loop", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def release(self, sequences: list[_Sequence]) -> None:
        """The request is answered, failed, or its client left: stop generating for it."""
        with self._changed:
            for sequence in sequences:
                sequence.cancelled = True
            self._in_flight -= 1

    def _wait_before_admitting(self) -> float | None:
        """Seconds until waiting requests should start (None: none wait; 0: now).

        A batch cannot grow once it runs, and on a CPU a step of 8 sequences yields about twice
        the tokens per second of a step of one (21 vs 5.5 ms on the benchmark proxy), so requests
        arriving a few milliseconds apart are worth gathering into one batch: they start once a
        full batch waits or the oldest has waited ``gather_seconds``, which bounds what this adds
        to the time to the first token. A lone client (no two requests in flight together for
        a second) never waits.
        """
        if not self._waiting:
            return None
        if self._rows is not None:
            return 0  # a request joins the running batch at the next step: nothing to gather
        if sum(len(sequences) for _, sequences in self._waiting) >= self._max_batch_size:
            return 0
        if time.monotonic() - self._last_concurrent > LONE_CLIENT_SECONDS:
            return 0
        return max(0.0, self._waiting[0][0] + self._gather_seconds - time.monotonic())

    def _admit(self) -> list[_Sequence]:
        """Take waiting requests, whole and in order, while their sequences fit beside those held
        (a request larger than that is taken when nothing else is held)."""
        held = sum(len(batch.sequences) for batch in self._batches)
        if self._rows is not None:
            held = len(self._rows.sequences)
        admitted: list[_Sequence] = []
        while self._waiting:
            _, sequences = self._waiting[0]
            if all(sequence.cancelled for sequence in sequences):
                self._waiting.popleft()  # its client left while it waited
                continue
            if held and held + len(sequences) > self._max_held:
                break
            self._waiting.popleft()
            admitted.extend(sequences)
            held += len(sequences)
        return admitted

    def _new_batches(self, admitted: list[_Sequence]) -> list[list[_Sequence]]:
        groups: dict[tuple, list[_Sequence]] = {}
        for sequence in admitted:
            groups.setdefault(sequence.search_key(), []).append(sequence)
        batches = []
        for sequences in groups.values():
            for start in range(0, len(sequences), self._max_batch_size):
                chunk = sequences[start : start + self._max_batch_size]
                longest = max(len(sequence.ids) for sequence in chunk)
                if longest + max(s.options["max_tokens"] for s in chunk) > self._context_length:
                    # Padding to the longest prompt would pass the context length; one at a time,
                    # each sequence fits (checked when it was encoded).
                    batches.extend([sequence] for sequence in chunk)
                else:
                    batches.append(chunk)
        return batches

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._busy() and (wait := self._wait_before_admitting()) != 0:
                        self._changed.wait(wait)
                    admitted = self._admit() if self._wait_before_admitting() == 0 else []
                if self._rows is not None:
                    self._step_rows(admitted)
                    continue
                for sequences in self._new_batches(admitted):
                    self._guarded(sequences, lambda batch=sequences: self._start(batch))
                for batch in list(self._batches):
                    self._guarded(batch.sequences, lambda b=batch: b.step(self._end_tokens))
                with self._changed:
                    self._batches = [batch for batch in self._batches if batch.live()]
        except BaseException as error:  # the loop itself broke: no waiter may hang on it
            with self._changed:
                stranded = [s for batch in self._batches for s in batch.sequences]
                stranded += self._rows.fail_all() if self._rows is not None else []
                stranded += [s for _, sequences in self._waiting for s in sequences]
                self._batches, self._waiting = [], deque()
            for sequence in stranded:
                sequence.fail(error)
            raise

    def _busy(self) -> bool:
        return bool(self._batches) or (self._rows is not None and self._rows.live())

    def _step_rows(self, admitted: list[_Sequence]) -> None:
        rows = self._rows
        if admitted:
            try:
                rows.add(admitted, self._end_tokens)
            except Exception:
                # Read again one by one, so that a prompt that fails fails only its own sequence.
                for sequence in admitted:
                    if sequence not in rows.sequences and sequence.finished is None:
                        self._guarded(
                            [sequence], lambda one=sequence: rows.add([one], self._end_tokens)
                        )
        if rows.live():
            try:
                rows.step(self._end_tokens)
            except Exception as error:  # a failed step leaves no row it can trust
                for sequence in rows.fail_all():
                    sequence.fail(error)

    def _start(self, sequences: list[_Sequence]) -> None:
        # Reading the prompts (prefill) happens here, between two decode steps of the others.
        self._batches.append(_Batch(self._model, self._tokenizer, self._pad_token, sequences))

    def _guarded(self, sequences: list[_Sequence], action: Callable[[], None]) -> None:
        """Run ``action``; if onnxruntime-genai fails, only these sequences fail with it."""
        try:
            action()
        except Exception as error:  # handed to the requests it concerns, not the loop
            for sequence in sequences:
                sequence.fail(error)
            self._batches = [b for b in self._batches if b.sequences is not sequences]


class OnnxChatModel(PythonModel):
    """Chat completions from an onnxruntime-genai model folder."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts[ONNX_ARTIFACT_KEY])
        config = context.model_config or {}
        threads = int(config.get("intra_op_num_threads", 0)) or _usable_cores()
        og_config = og.Config(str(folder))
        # Set explicitly: on the benchmark proxy (2 cores) onnxruntime's default thread pool
        # decoded 153 tokens/s and a pool of both cores 240 (benchmarks/model_speed.py).
        og_config.overlay(
            json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
            )
        )
        genai_config = json.loads((folder / "genai_config.json").read_text())
        self._tokenizer = og.Tokenizer(og_config)
        rows = None
        if config.get("batching", "auto") != "generators":
            rows = _SharedRows.open(folder, genai_config, self._tokenizer, threads)
        # Without rows, onnxruntime-genai loads the model; with them it would be a second copy.
        self._model = og.Model(og_config) if rows is None else None
        self._context_length = int(genai_config["model"]["context_length"])
        self._end_tokens = set(int(token) for token in self._tokenizer.eos_token_ids)
        template = folder / "chat_template.jinja"
        # transformers 5 keeps the template beside tokenizer_config.json rather than inside it;
        # give it to onnxruntime-genai explicitly so both runtimes format prompts identically.
        self._chat_template = template.read_text() if template.is_file() else None
        self._name = str(config.get("model_name", "onnx-chat-model"))
        self._default_max_tokens = int(config.get("max_new_tokens", 64))
        self._max_tokens_cap = int(config.get("max_tokens_cap", self._context_length))
        self._default_sampling = bool(config.get("do_sample", False))
        self._default_temperature = float(config.get("temperature", 1.0))
        self._default_top_p = float(config.get("top_p", 1.0))
        self._loop = _DecodeLoop(
            self._model, self._tokenizer, end_tokens=self._end_tokens,
            pad_token=int(self._tokenizer.pad_token_id), context_length=self._context_length,
            max_batch_size=int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
            max_queued_requests=int(config.get("max_queued_requests",
                                               DEFAULT_MAX_QUEUED_REQUESTS)),
            gather_seconds=float(config.get("batch_wait_ms", DEFAULT_BATCH_WAIT_MS)) / 1000,
            rows=rows,
        )  # fmt: skip

    # MLflow hands predict a DataFrame built from the signature; the hint says so, and a
    # DataFrame hint tells MLflow not to derive a second schema from it.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Answer every row: chat rows with completions, prompt rows with text. (Called directly,
        a request dict or a list of them is accepted too.)"""
        rows = _rows(model_input)
        # Schema enforcement drops unknown fields, so a request with neither field arrives empty.
        if not rows or any("messages" not in row and "prompt" not in row for row in rows):
            raise BadRequestError("Each row needs 'messages' (a chat) or 'prompt' (text)")
        kinds = {"messages" in row for row in rows}
        if len(kinds) > 1:
            raise BadRequestError("Do not mix chat ('messages') and 'prompt' rows in one request")
        chat = kinds == {True}
        # Every row is checked before any is generated: a bad row fails the request at once.
        prepared = [self._prepare(row, params or {}, chat=chat) for row in rows]
        flat = [(ids, options) for ids, options in prepared for _ in range(options["n"])]
        results = iter(self._generate(flat))
        answers = [[next(results) for _ in range(options["n"])] for _, options in prepared]
        if chat:
            return [self._chat_completion(ids, answers[index])
                    for index, (ids, _) in enumerate(prepared)]  # fmt: skip
        return [choices[0][0] for choices in answers]

    # The same hint as predict; MLflow passes one request here (``predict_stream`` takes one).
    def predict_stream(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Stream one chat request as OpenAI ``chat.completion.chunk`` dicts: each choice's role,
        then its content as it is generated, then its finish_reason; the last chunk carries the
        usage. The request is checked and queued before the first chunk is asked for."""
        rows = _rows(model_input)
        if len(rows) != 1 or "messages" not in rows[0]:
            raise BadRequestError("predict_stream answers one chat request {'messages': [...]}")
        ids, options = self._prepare(rows[0], params or {}, chat=True)
        sequences, events = self._submit([(ids, options)] * options["n"], streaming=True)
        return self._chunks(ids, sequences, events)

    def _chunks(
        self, ids: list[int], sequences: list[_Sequence], events: queue.Queue
    ) -> Iterator[dict[str, Any]]:
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                  "created": int(time.time()), "model": self._name}  # fmt: skip

        def chunk(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
            return {**header, "choices": [choice]}

        try:
            for sequence in sequences:
                yield chunk(sequence.index, {"role": "assistant", "content": ""}, None)
            remaining, completion_tokens = len(sequences), 0
            while remaining:
                index, kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "delta":
                    yield chunk(index, {"content": value}, None)
                    continue
                remaining -= 1
                completion_tokens += value[1]
                last = chunk(index, {}, value[2])
                if not remaining:
                    last["usage"] = {"prompt_tokens": len(ids),
                                     "completion_tokens": completion_tokens,
                                     "total_tokens": len(ids) + completion_tokens}  # fmt: skip
                yield last
        finally:
            # Also when the client stops reading: that frees its place in the decode loop.
            self._loop.release(sequences)

    def _prepare(
        self, row: dict[str, Any], params: dict[str, Any], *, chat: bool
    ) -> tuple[list[int], dict[str, Any]]:
        """Validate one row and turn it into prompt token ids and generation options."""
        if chat:
            messages = _messages(row["messages"])
            options = self._options(row, params)
            prompt = self._tokenizer.apply_chat_template(
                json.dumps(messages), template_str=self._chat_template, add_generation_prompt=True
            )
        else:
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not prompt:
                raise BadRequestError("'prompt' must be a non-empty string")
            options = {**self._options(row, params), "n": 1}
        return self._encode(prompt, options["max_tokens"]), options

    def _options(self, row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        merged = {**params, **row}
        max_tokens = merged.get("max_tokens", self._default_max_tokens)
        if (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int | float)
            or max_tokens != int(max_tokens)
            or not 1 <= max_tokens <= self._max_tokens_cap
        ):
            raise BadRequestError(
                f"'max_tokens' must be an integer from 1 to {self._max_tokens_cap}; "
                f"got {max_tokens!r}"
            )
        temperature, top_p = merged.get("temperature"), merged.get("top_p")
        # Sampling exactly when asked for: a temperature or top_p in the request, or the model's
        # configured default. Otherwise greedy, where temperature would have no effect.
        sampling = _present(temperature) or _present(top_p) or self._default_sampling
        temperature = float(temperature) if _present(temperature) else self._default_temperature
        top_p = float(top_p) if _present(top_p) else self._default_top_p
        if sampling and temperature <= 0:
            raise BadRequestError(f"'temperature' must be greater than 0; got {temperature}")
        if sampling and not 0 < top_p <= 1:
            raise BadRequestError(f"'top_p' must be in (0, 1]; got {top_p}")
        seed = merged.get("seed")
        if _present(seed) and (
            isinstance(seed, bool)
            or not isinstance(seed, int | float)
            or seed != int(seed)
            or seed < 0
        ):
            raise BadRequestError(f"'seed' must be a non-negative integer; got {seed!r}")
        choices = merged.get("n", 1)
        if not isinstance(choices, int | float) or not 1 <= choices <= MAX_CHOICES:
            raise BadRequestError(f"'n' must be from 1 to {MAX_CHOICES}; got {choices!r}")
        return {
            "max_tokens": int(max_tokens),
            "sampling": sampling,
            "temperature": temperature,
            "top_p": top_p,
            "stop": _stop_strings(merged.get("stop")),
            "n": int(choices),
            # Sampling with a seed is reproducible (OpenAI's `seed`); greedy ignores it.
            "seed": int(seed) if _present(seed) else None,
        }

    def _encode(self, prompt: str, max_tokens: int) -> list[int]:
        ids = [int(token) for token in self._tokenizer.encode(prompt)]
        if len(ids) + max_tokens > self._context_length:
            raise BadRequestError(
                f"The prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"model's context length of {self._context_length} tokens"
            )
        return ids

    def _generate(
        self, sequences: list[tuple[list[int], dict[str, Any]]]
    ) -> list[tuple[str, int, str]]:
        """Generate answers on the decode loop and wait for all of them.

        Returns, for each sequence in order, its text, its token count and why it finished.
        """
        work, events = self._submit(sequences, streaming=False)
        results: list[tuple[str, int, str] | None] = [None] * len(work)
        remaining = len(work)
        try:
            while remaining:
                index, kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    results[index], remaining = value, remaining - 1
        finally:
            self._loop.release(work)
        return results

    def _submit(
        self, sequences: list[tuple[list[int], dict[str, Any]]], *, streaming: bool
    ) -> tuple[list[_Sequence], queue.Queue]:
        """Queue one request's sequences on the decode loop; their events arrive on the queue."""
        events: queue.Queue = queue.Queue()
        work = [_Sequence(index, ids, options, lambda *event: events.put(event), owner=events,
                          streaming=streaming)
                for index, (ids, options) in enumerate(sequences)]  # fmt: skip
        self._loop.submit(work)
        return work, events

    def _chat_completion(
        self, ids: list[int], answers: list[tuple[str, int, str]]
    ) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
            for index, (text, _, finish_reason) in enumerate(answers)
        ]
        completion_tokens = sum(produced for _, produced, _ in answers)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens,
            },
        }


set_model(OnnxChatModel())

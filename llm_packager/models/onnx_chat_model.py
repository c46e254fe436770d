"""An OpenAI-compatible chat model over onnxruntime-genai, logged to MLflow as code.

This file is the model: ``mlflow.pyfunc.log_model(python_model=<this file>)`` stores it as source
and ``set_model`` at the bottom names the instance, so loading never unpickles code. It holds the
pyfunc class and nothing else. Its own code (request checks, the decoders, the decode loop, the
keys) is ``llm_packager/serving``, logged beside this file as the package ``llm_packager_serving``
in the model's ``code/`` folder (``llm_packager.models.served_code``), which MLflow puts on
``sys.path`` before it runs this file. It imports only that package and what the served model's
requirements install (onnxruntime-genai, numpy, pandas, mlflow), not the rest of this project, so
the model loads where the project is not installed.

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
sequences join and leave at every step (``SharedRows``: continuous batching on a key/value cache
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

import importlib.machinery
import json
import math
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime_genai as og
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

# MLflow puts this model's code/ folder first on sys.path just before it runs this file, but a
# package already imported in this process (another model's copy, or the copy staged while this
# one was logged) would be reused from sys.modules. So a cached copy from another folder is
# forgotten first, and this model runs its own code. (Models already loaded keep the modules they
# imported: their classes and functions hold them.)
_SERVED_PACKAGE = "llm_packager_serving"
_logged_copy = importlib.machinery.PathFinder.find_spec(_SERVED_PACKAGE)
_cached_copy = sys.modules.get(_SERVED_PACKAGE)
if _logged_copy and _cached_copy and _cached_copy.__file__ != _logged_copy.origin:
    for _name in list(sys.modules):
        if _name == _SERVED_PACKAGE or _name.startswith(f"{_SERVED_PACKAGE}."):
            del sys.modules[_name]

from llm_packager_serving.decode_loop import (  # noqa: E402
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DecodeLoop,
    usable_cores,
)
from llm_packager_serving.keys import (  # noqa: E402
    BATCH_WAIT_MS_KEY,
    BATCHING_KEY,
    DO_SAMPLE_KEY,
    INTRA_OP_NUM_THREADS_KEY,
    MAX_BATCH_SIZE_KEY,
    MAX_NEW_TOKENS_KEY,
    MAX_QUEUED_REQUESTS_KEY,
    MAX_TOKENS_CAP_KEY,
    MODEL_NAME_KEY,
    ONNX_ARTIFACT_KEY,
    TEMPERATURE_KEY,
    TOP_P_KEY,
)
from llm_packager_serving.requests import (  # noqa: E402
    MAX_CHOICES,
    MAX_SEED,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    BadRequestError,
    chat_messages,
    number,
    request_rows,
    stop_strings,
)
from llm_packager_serving.scoring_server import grow_server_threads, server_timeout  # noqa: E402
from llm_packager_serving.sequence import ReleasingStream, Sequence  # noqa: E402
from llm_packager_serving.shared_rows import SharedRows  # noqa: E402


class OnnxChatModel(PythonModel):
    """Chat completions from an onnxruntime-genai model folder."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts[ONNX_ARTIFACT_KEY])
        config = context.model_config or {}
        threads = int(config.get(INTRA_OP_NUM_THREADS_KEY, 0)) or usable_cores()
        og_config = og.Config(str(folder))
        # Set explicitly: on the benchmark proxy (2 cores) onnxruntime's default thread pool
        # decoded 153 tokens/s and a pool of both cores 240 (benchmarks/model_speed.py).
        og_config.overlay(
            json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
            )
        )
        genai_config = json.loads((folder / "genai_config.json").read_text())
        max_batch_size = int(config.get(MAX_BATCH_SIZE_KEY, DEFAULT_MAX_BATCH_SIZE))
        max_queued_requests = int(config.get(MAX_QUEUED_REQUESTS_KEY, DEFAULT_MAX_QUEUED_REQUESTS))
        # Two tokenizers, as onnxruntime-genai documents no thread safety for one: the decode
        # loop's own (its streams decode generated text), and one that request threads encode
        # with, one at a time.
        loop_tokenizer = og.Tokenizer(og_config)
        self._tokenizer, self._tokenizer_lock = og.Tokenizer(og_config), threading.Lock()
        rows = None
        if config.get(BATCHING_KEY, "auto") != "generators":
            rows = SharedRows.open(folder, genai_config, loop_tokenizer, threads, max_batch_size)
        # Without rows, onnxruntime-genai loads the model; with them it would be a second copy.
        self._model = og.Model(og_config) if rows is None else None
        self._context_length = int(genai_config["model"]["context_length"])
        self._end_tokens = set(int(token) for token in self._tokenizer.eos_token_ids)
        template = folder / "chat_template.jinja"
        # transformers 5 keeps the template beside tokenizer_config.json rather than inside it;
        # give it to onnxruntime-genai explicitly so both runtimes format prompts identically.
        self._chat_template = template.read_text() if template.is_file() else None
        self._name = str(config.get(MODEL_NAME_KEY, "onnx-chat-model"))
        self._default_max_tokens = int(config.get(MAX_NEW_TOKENS_KEY, 64))
        self._max_tokens_cap = int(config.get(MAX_TOKENS_CAP_KEY, self._context_length))
        self._default_sampling = bool(config.get(DO_SAMPLE_KEY, False))
        self._default_temperature = float(config.get(TEMPERATURE_KEY, 1.0))
        self._default_top_p = float(config.get(TOP_P_KEY, 1.0))
        self._loop = DecodeLoop(
            self._model, loop_tokenizer, end_tokens=self._end_tokens,
            pad_token=int(self._tokenizer.pad_token_id), context_length=self._context_length,
            max_batch_size=max_batch_size, max_queued_requests=max_queued_requests,
            gather_seconds=float(config.get(BATCH_WAIT_MS_KEY, DEFAULT_BATCH_WAIT_MS)) / 1000,
            rows=rows,
        )  # fmt: skip
        self._deadline_seconds = server_timeout()
        grow_server_threads(max_batch_size * 2 + max_queued_requests)

    # MLflow hands predict a DataFrame built from the signature; the hint says so, and a
    # DataFrame hint tells MLflow not to derive a second schema from it.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Answer every row: chat rows with completions, prompt rows with text. (Called directly,
        a request dict or a list of them is accepted too.)"""
        rows = request_rows(model_input)
        # Schema enforcement drops unknown fields, so a request with neither field arrives empty.
        if not rows or any("messages" not in row and "prompt" not in row for row in rows):
            raise BadRequestError("Each row needs 'messages' (a chat) or 'prompt' (text)")
        kinds = {"messages" in row for row in rows}
        if len(kinds) > 1:
            raise BadRequestError("Do not mix chat ('messages') and 'prompt' rows in one request")
        chat = kinds == {True}
        # Every row is checked before any is generated: a bad row fails the request at once.
        prepared = [self._prepare(row, params or {}, chat=chat) for row in rows]
        flat = [(ids, {**options, "choice": choice})
                for ids, options in prepared for choice in range(options["n"])]  # fmt: skip
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
        rows = request_rows(model_input)
        if len(rows) != 1 or "messages" not in rows[0]:
            raise BadRequestError("predict_stream answers one chat request {'messages': [...]}")
        ids, options = self._prepare(rows[0], params or {}, chat=True)
        sequences, events = self._submit(
            [(ids, {**options, "choice": choice}) for choice in range(options["n"])],
            streaming=True,
        )
        return ReleasingStream(self._chunks(ids, sequences, events),
                               lambda: self._loop.release(sequences))  # fmt: skip

    def _chunks(
        self, ids: list[int], sequences: list[Sequence], events: queue.Queue
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
            messages = chat_messages(row["messages"])
            options = self._options(row, params)
            with self._tokenizer_lock:
                prompt = self._tokenizer.apply_chat_template(
                    json.dumps(messages), template_str=self._chat_template,
                    add_generation_prompt=True,
                )  # fmt: skip
        else:
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not prompt:
                raise BadRequestError("'prompt' must be a non-empty string")
            options = {**self._options(row, params), "n": 1}
        return self._encode(prompt, options["max_tokens"]), options

    def _options(self, row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """The generation options of one row, each checked to a finite, sane range: a NaN,
        an infinity or a denormal never reaches the sampler (a 1e-320 temperature once turned
        the sampler's weights into NaN)."""
        merged = {key: value for key, value in {**params, **row}.items() if value is not None}
        max_tokens = number("max_tokens", merged.get("max_tokens", self._default_max_tokens), 1,
                            self._max_tokens_cap, integer=True)  # fmt: skip
        # Sampling exactly when asked for: a temperature or top_p in the request, or the model's
        # configured default. Otherwise greedy, where temperature would have no effect.
        sampling = "temperature" in merged or "top_p" in merged or self._default_sampling
        if merged.get("temperature") == 0:
            # OpenAI's way of asking for the greedy answer: greedy, whatever else is set (a
            # top_p given with it is still checked below, but has no effect).
            sampling = False
            del merged["temperature"]
        temperature = merged.get("temperature", self._default_temperature)
        top_p = merged.get("top_p", self._default_top_p)
        if sampling:
            temperature = number("temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
        if sampling or "top_p" in merged:
            top_p = number("top_p", top_p, 0, 1, low_open=True)
        seed = merged.get("seed")
        if seed is not None:
            seed = int(number("seed", seed, 0, MAX_SEED, integer=True))
        choices = number("n", merged.get("n", 1), 1, MAX_CHOICES, integer=True)
        return {
            "max_tokens": int(max_tokens),
            "sampling": sampling,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "stop": stop_strings(merged.get("stop")),
            "n": int(choices),
            # Sampling with a seed is reproducible (OpenAI's `seed`); greedy ignores it.
            "seed": seed,
        }

    def _encode(self, prompt: str, max_tokens: int) -> list[int]:
        with self._tokenizer_lock:
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
        # Under `mlflow models serve` the server answers 504 at its request timeout but cannot
        # stop this thread; at the same moment this request gives its rows back.
        deadline = time.monotonic() + (self._deadline_seconds or math.inf)
        try:
            while remaining:
                try:
                    index, kind, value = events.get(
                        timeout=min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)
                    )
                except queue.Empty:
                    raise TimeoutError(
                        f"No answer within the scoring server's request timeout "
                        f"({self._deadline_seconds:g} s); generation for it was stopped"
                    ) from None
                if kind == "error":
                    raise value
                if kind == "done":
                    results[index], remaining = value, remaining - 1
        finally:
            self._loop.release(work)
        return results

    def _submit(
        self, sequences: list[tuple[list[int], dict[str, Any]]], *, streaming: bool
    ) -> tuple[list[Sequence], queue.Queue]:
        """Queue one request's sequences on the decode loop; their events arrive on the queue."""
        events: queue.Queue = queue.Queue()
        work = [Sequence(index, ids, options, lambda *event: events.put(event), owner=events,
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

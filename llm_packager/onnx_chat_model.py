"""An OpenAI-compatible chat model over onnxruntime-genai, logged to MLflow as code.

This file is the model: ``mlflow.pyfunc.log_model(python_model=<this file>)`` stores it as source
and ``set_model`` at the bottom names the instance, so loading never unpickles code. It imports
only what the served model's requirements install (onnxruntime-genai, numpy, pandas, mlflow), not
the rest of this project.

Two request shapes are served:

- an OpenAI chat request (``messages`` plus optional ``max_tokens``, ``temperature``, ``top_p``,
  ``stop``, ``n``), answered with an OpenAI chat completion, as the transformers model does;
- the reference sample's ``{"prompt": "<already templated text>"}``, answered with plain text.

Every row of a batch is answered. Rows that decode with the same search options are generated
together, up to ``max_batch_size`` sequences at a time, as one onnxruntime-genai batch: on a CPU,
decoding one sequence is bound by reading the weights, and a batch reads them once per step for
all its sequences. Each ``predict`` call gets its own ``GeneratorParams`` and ``Generator``, so
concurrent requests never share generation state.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

ONNX_ARTIFACT_KEY = "onnx_model"
ROLES = ("system", "user", "assistant")
MAX_CHOICES = 8
DEFAULT_MAX_BATCH_SIZE = 8


class BadRequestError(MlflowException):
    """A request the model refuses; the scoring server answers it with HTTP 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


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
        self._model = og.Model(og_config)
        self._tokenizer = og.Tokenizer(self._model)
        genai_config = json.loads((folder / "genai_config.json").read_text())
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
        self._max_batch_size = int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self._pad_token = int(self._tokenizer.pad_token_id)

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
        answers = self._generate_all(prepared)
        if chat:
            return [
                self._chat_completion(ids, answers[index])
                for index, (ids, _) in enumerate(prepared)
            ]
        return [answers[index][0][0] for index in range(len(prepared))]

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

    def _generate_all(
        self, prepared: list[tuple[list[int], dict[str, Any]]]
    ) -> dict[int, list[tuple[str, int, str]]]:
        """Generate every choice of every row, batching those with the same search options."""
        groups: dict[tuple, list[tuple[int, list[int], dict[str, Any]]]] = {}
        for index, (ids, options) in enumerate(prepared):
            key = (options["sampling"], options["temperature"], options["top_p"], options["seed"])
            groups.setdefault(key, []).extend((index, ids, options) for _ in range(options["n"]))
        answers: dict[int, list[tuple[str, int, str]]] = {
            index: [] for index in range(len(prepared))
        }
        for sequences in groups.values():
            for start in range(0, len(sequences), self._max_batch_size):
                chunk = sequences[start : start + self._max_batch_size]
                padded = max(len(ids) for _, ids, _ in chunk)
                if (
                    padded + max(options["max_tokens"] for *_, options in chunk)
                    > self._context_length
                ):
                    # Padding to the longest prompt would pass the context length; one at a time,
                    # each row fits (checked when it was encoded).
                    results = [self._generate([(ids, options)])[0] for _, ids, options in chunk]
                else:
                    results = self._generate([(ids, options) for _, ids, options in chunk])
                for (index, _, _), result in zip(chunk, results, strict=True):
                    answers[index].append(result)
        return answers

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
        """Generate answers to prompts that share search options, as one batch.

        Returns, for each sequence, its text, its token count and why it finished.
        """
        options = sequences[0][1]
        longest = max(len(ids) for ids, _ in sequences)
        search: dict[str, Any] = {
            "max_length": longest + max(row_options["max_tokens"] for _, row_options in sequences),
            "do_sample": options["sampling"],
            "batch_size": len(sequences),
        }
        if options["sampling"]:
            search |= {"temperature": options["temperature"], "top_p": options["top_p"]}
            if options["seed"] is not None:
                search["random_seed"] = options["seed"]
        generator_params = og.GeneratorParams(self._model)
        generator_params.set_search_options(**search)
        generator = og.Generator(self._model, generator_params)
        # Padded on the right with the pad token, as Tokenizer.encode_batch does; onnxruntime-genai
        # masks pad positions, so each answer equals the one the prompt gets alone.
        batch = np.full((len(sequences), longest), self._pad_token, dtype=np.int32)
        for row, (ids, _) in enumerate(sequences):
            batch[row, : len(ids)] = ids
        generator.append_tokens(batch)
        streams = [self._tokenizer.create_stream() for _ in sequences]
        texts, produced = [""] * len(sequences), [0] * len(sequences)
        finished: list[str | None] = [None] * len(sequences)
        while None in finished and not generator.is_done():
            generator.generate_next_token()
            for row, token in enumerate(int(token) for token in generator.get_next_tokens()):
                if finished[row] is not None:
                    continue
                if token in self._end_tokens:
                    finished[row] = "stop"
                    continue
                row_options = sequences[row][1]
                produced[row] += 1
                texts[row] += streams[row].decode(token)
                cut = min(
                    (texts[row].find(stop) for stop in row_options["stop"] if stop in texts[row]),
                    default=-1,
                )
                if cut >= 0:
                    texts[row], finished[row] = texts[row][:cut], "stop"
                elif produced[row] == row_options["max_tokens"]:
                    finished[row] = "length"
        return [
            (text, count, reason or "stop")
            for text, count, reason in zip(texts, produced, finished, strict=True)
        ]

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

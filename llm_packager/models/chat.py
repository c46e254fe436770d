"""The OpenAI chat-completion contract that every chat model of this project must honour."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_packager.errors import UserError

FINISH_REASONS = ("stop", "length")
EXAMPLE_CHAT_REQUEST: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is the capital of Spain?"}]
}


class MalformedCompletionError(UserError, ValueError):
    """A model answered with something that is not an OpenAI chat completion."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedCompletionError(f"Not an OpenAI chat completion: {message}")


def check_chat_completion(completion: Any, *, max_tokens: int | None = None) -> None:
    """Check the fields and types of one chat completion.

    Args:
        completion: one completion (a dict), as returned for one request.
        max_tokens: if given, ``usage.completion_tokens`` must not exceed it.

    Raises:
        MalformedCompletionError: naming the first field that is missing or wrong.
    """
    _require(isinstance(completion, dict), f"expected a dict, got {type(completion).__name__}")
    for field, kind in (("id", str), ("object", str), ("created", int), ("model", str)):
        _require(isinstance(completion.get(field), kind), f"'{field}' must be a {kind.__name__}")
    _require(completion["object"] == "chat.completion", "'object' must be 'chat.completion'")
    choices = completion.get("choices")
    _require(isinstance(choices, list) and len(choices) > 0, "'choices' must be a non-empty list")
    for index, choice in enumerate(choices):
        _require(isinstance(choice, dict), f"choices[{index}] must be a dict")
        message = choice.get("message")
        _require(isinstance(message, dict), f"choices[{index}].message must be a dict")
        _require(message.get("role") == "assistant", f"choices[{index}].message.role")
        _require(isinstance(message.get("content"), str), f"choices[{index}].message.content")
        _require(
            choice.get("finish_reason") in FINISH_REASONS,
            f"choices[{index}].finish_reason must be one of {FINISH_REASONS}",
        )
    usage = completion.get("usage")
    _require(isinstance(usage, dict), "'usage' must be a dict")
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        _require(isinstance(usage.get(field), int), f"usage.{field} must be an int")
    _require(
        usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"],
        "usage.total_tokens must equal prompt_tokens + completion_tokens",
    )
    if max_tokens is not None:
        _require(
            usage["completion_tokens"] <= max_tokens,
            f"usage.completion_tokens {usage['completion_tokens']} exceeds max_tokens {max_tokens}",
        )


# Answers to the load-back check stay short: it proves the model answers, not how well.
CHECK_MAX_TOKENS = 8


@dataclass(frozen=True)
class LoadBackCheck:
    """A logged model, downloaded and loaded as a server would load it, and its answers."""

    size_bytes: int
    load_seconds: float
    answers: list[Any]


@dataclass(frozen=True)
class LoadedModel:
    """A logged model loaded as a server would load it, with its size and load time."""

    model: Any
    size_bytes: int
    load_seconds: float


def load_logged_model(model_uri: str, scratch: Path) -> LoadedModel:
    """Download a logged model by its URI into ``scratch`` and load it with ``mlflow.pyfunc``,
    timing the load (not the download)."""
    import mlflow

    from llm_packager.sources.manifest import folder_bytes

    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(scratch)))
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(str(local))
    return LoadedModel(model, folder_bytes(local), time.perf_counter() - started)


def load_back_and_answer(model_uri: str, *extra_requests: dict[str, Any]) -> LoadBackCheck:
    """Download a logged model by its URI, load it with ``mlflow.pyfunc`` and answer
    `EXAMPLE_CHAT_REQUEST` (checked to be a well-formed chat completion), then ``extra_requests``.

    Raises:
        MalformedCompletionError: the chat answer is not an OpenAI chat completion.
    """
    requests = [{**EXAMPLE_CHAT_REQUEST, "max_tokens": CHECK_MAX_TOKENS}, *extra_requests]
    with tempfile.TemporaryDirectory(prefix="logged-model-") as scratch:
        loaded = load_logged_model(model_uri, Path(scratch))
        answers = [loaded.model.predict(request)[0] for request in requests]
    check_chat_completion(answers[0], max_tokens=CHECK_MAX_TOKENS)
    return LoadBackCheck(loaded.size_bytes, loaded.load_seconds, answers)

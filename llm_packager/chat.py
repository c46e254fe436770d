"""The OpenAI chat-completion contract that every chat model of this project must honour."""

from __future__ import annotations

from typing import Any

FINISH_REASONS = ("stop", "length")
EXAMPLE_CHAT_REQUEST: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is the capital of Spain?"}]
}


class MalformedCompletionError(ValueError):
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

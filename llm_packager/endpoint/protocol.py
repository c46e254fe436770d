"""OpenAI's chat-completions wire format, translated to and from our pyfunc chat models.

Requests are checked here against the ranges OpenAI's API reference gives for each field
(https://platform.openai.com/docs/api-reference/chat/create), so that both flavors refuse the
same bad requests with the same 400: the transformers flavor has no hook to check a request
before its pipeline runs (docs/serving.md, "Bad requests"). What a model limits further (the ONNX
model's `n` and context length) it refuses itself, and its error is passed on.

Error bodies take OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; the model
error for an unknown model is the one OpenAI answers (404, ``invalid_request_error``, param
``model``, code ``model_not_found``, as quoted in https://community.openai.com/t/1278979/3).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any

_logger = logging.getLogger(__name__)

# The request fields this endpoint answers itself; they never reach the model.
ENDPOINT_FIELDS = frozenset({"model", "stream", "stream_options", "user"})
# OpenAI's newer name for max_tokens; a model is given `max_tokens`.
MAX_COMPLETION_TOKENS = "max_completion_tokens"
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_MAX_STOP_STRINGS = 4  # OpenAI: "Up to 4 sequences where the API will stop generating"


class OpenAIError(Exception):
    """A request refused or failed, told as an OpenAI error object with its HTTP status."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The error object OpenAI's clients read: ``{"error": {...}}``."""
        return {
            "error": {
                "message": self.message,
                # OpenAI's two kinds: the client's request at fault, or the server.
                "type": "invalid_request_error" if self.status < 500 else "server_error",
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    """A 400 naming the field at fault."""
    return OpenAIError(400, message, param=param)


def unknown_model(requested: str, served: str) -> OpenAIError:
    """The 404 OpenAI answers for a model it does not serve."""
    return OpenAIError(
        404,
        f"The model '{requested}' does not exist. This server serves '{served}'.",
        param="model",
        code="model_not_found",
    )


def error_from_model(error: Exception) -> OpenAIError:
    """The OpenAI error for an exception a model raised.

    MLflow exceptions carry their HTTP status in their error code: the ONNX model's refused
    request is ``INVALID_PARAMETER_VALUE`` (400) and its full queue ``TEMPORARILY_UNAVAILABLE``
    (503), as ``llm_packager/serving/requests.py`` defines them; MLflow's own schema check raises
    400s too. Their messages are written for the client and pass through.

    Anything else is a failure of the model, a 500. Its text stays in the server's log: an
    exception's message can hold a file path, a URL with its credentials or a piece of someone
    else's request, so the client gets the exception's type and an error id to quote, which the
    logged traceback carries too (OpenAI's own 500 names no cause either).
    """
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        if status < 500 or status == 503:
            return OpenAIError(status, error.message, code=error.error_code.lower())
    error_id = uuid.uuid4().hex[:12]
    _logger.error("The model failed (error id %s)", error_id, exc_info=error)
    return OpenAIError(
        500,
        f"The model failed ({type(error).__name__}; error id {error_id}): the server's log "
        "has the details.",
    )


@dataclass(frozen=True)
class ChatRequest:
    """A checked OpenAI chat request: what the model is given, and how to answer."""

    model_request: dict[str, Any]
    stream: bool
    include_usage: bool
    requested_model: str | None = None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; NaN and infinities are refused, as JSON has none."""

    def refuse_constant(name: str) -> Any:
        raise bad_request(f"The body is not valid JSON: {name} is not a JSON number.")

    try:
        body = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"The body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.")
    return body


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {value!r}.", name)
    if value < low or (high is not None and value > high):
        limits = f"at least {low}" if high is None else f"between {low} and {high}"
        raise bad_request(f"'{name}' must be {limits}, got {value}.", name)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {value!r}.", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low:g} and {high:g}, got {value}.", name)


def _messages(value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of messages.", "messages")
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object.", "messages")
        if message.get("role") not in _ROLES:
            raise bad_request(
                f"'{where}.role' must be one of {sorted(_ROLES)}, got {message.get('role')!r}.",
                "messages",
            )
        if not isinstance(message.get("content"), str):
            raise bad_request(f"'{where}.content' must be a string.", "messages")


def _stop(body: dict[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not all(isinstance(stop, str) and stop for stop in stops)
        or len(stops) > _MAX_STOP_STRINGS
    ):
        raise bad_request(
            f"'stop' must be a string or a list of up to {_MAX_STOP_STRINGS} non-empty strings.",
            "stop",
        )
    return stops


def chat_request(body: dict[str, Any], accepted: frozenset[str]) -> ChatRequest:
    """Check an OpenAI chat request and build the model's request from it.

    Args:
        body: the parsed request body.
        accepted: the request fields the model's signature names (its input schema).

    Raises:
        OpenAIError: a 400 naming the first field at fault.
    """
    _messages(body.get("messages"))
    if body.get(MAX_COMPLETION_TOKENS) is not None and body.get("max_tokens") is not None:
        raise bad_request(
            f"Give 'max_tokens' or '{MAX_COMPLETION_TOKENS}', not both.", MAX_COMPLETION_TOKENS
        )
    _integer(body, MAX_COMPLETION_TOKENS, 1)
    _integer(body, "max_tokens", 1)
    _integer(body, "n", 1)
    _integer(body, "seed", -(2**63), 2**63 - 1)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request(f"'stream' must be a boolean, got {stream!r}.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {model!r}.", "model")

    request: dict[str, Any] = {}
    for name, value in body.items():
        if name in ENDPOINT_FIELDS or value is None:
            continue
        target = "max_tokens" if name == MAX_COMPLETION_TOKENS else name
        if target not in accepted:
            raise bad_request(f"'{name}' is not supported by this model.", name)
        request[target] = value
    if "stop" in request:
        request["stop"] = _stop(body)
    return ChatRequest(
        model_request=request,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        requested_model=model,
    )


def served_completion(completion: dict[str, Any], served_name: str) -> dict[str, Any]:
    """A model's chat completion as this endpoint answers it: named by the served model."""
    return {**completion, "model": served_name}


def served_chunk(chunk: dict[str, Any], served_name: str) -> tuple[dict[str, Any], Any]:
    """A model's stream chunk as this endpoint sends it, and the usage it carried (or None).

    OpenAI sends usage only in a last chunk of its own, with no choices, and only when the
    client asks for it (``stream_options.include_usage``), so it is taken off the model's chunk.
    """
    served = {key: value for key, value in chunk.items() if key != "usage"}
    served["model"] = served_name
    return served, chunk.get("usage")


def usage_chunk(last: dict[str, Any], usage: Any) -> dict[str, Any]:
    """OpenAI's closing chunk for ``include_usage``: no choices, the request's usage."""
    return {
        "id": last.get("id"),
        "object": "chat.completion.chunk",
        "created": last.get("created"),
        "model": last.get("model"),
        "choices": [],
        "usage": usage,
    }


def completion_as_chunk(completion: dict[str, Any]) -> dict[str, Any]:
    """A whole chat completion as one ``chat.completion.chunk``, for a model that cannot
    stream: each choice's whole message is its delta, with its finish reason. It keeps the
    completion's usage, which `served_chunk` takes off."""
    return {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created"),
        "model": completion.get("model"),
        "choices": [
            {
                "index": choice.get("index", index),
                "delta": {
                    "role": choice["message"].get("role", "assistant"),
                    "content": choice["message"].get("content", ""),
                },
                "finish_reason": choice.get("finish_reason"),
            }
            for index, choice in enumerate(completion.get("choices", []))
        ],
        "usage": completion.get("usage"),
    }


def server_sent_event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event, ``data: <json>`` and a blank line, as OpenAI streams them."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE_EVENT = server_sent_event("[DONE]")


def models_list(served_name: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model this server serves."""
    return {"object": "list", "data": [model_card(served_name, created)]}


def model_card(served_name: str, created: int) -> dict[str, Any]:
    """OpenAI's model object for the served model."""
    return {"id": served_name, "object": "model", "created": created, "owned_by": "llm_packager"}

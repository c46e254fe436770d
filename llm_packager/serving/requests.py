"""What a request may hold, and the errors a refused request gets.

The scoring server answers a ``BadRequestError`` with HTTP 400 and a ``BusyError`` with 503, from
the error code each carries. Every check here runs before anything is generated.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    TEMPORARILY_UNAVAILABLE,
)

ROLES = ("system", "user", "assistant")
MAX_CHOICES = 8
# Sampling temperatures outside this range are refused. Below it the logits divided by the
# temperature overflow (1e-320 turned them into NaN and broke the sampler); above it sampling is
# uniform noise. Greedy decoding (no temperature) is the deterministic choice.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
# onnxruntime-genai takes its random_seed as a 32-bit integer.
MAX_SEED = 2**31 - 1


class BadRequestError(MlflowException):
    """A request the model refuses; the scoring server answers it with HTTP 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class RowFailedError(MlflowException):
    """Generating one sequence failed (its sampling, its text, or a model run on its row); the
    other sequences in the batch go on. The scoring server answers it with HTTP 500."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INTERNAL_ERROR)


class BusyError(MlflowException):
    """The decode loop's queue is full; the scoring server answers it with HTTP 503."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=TEMPORARILY_UNAVAILABLE)


def present(value: Any) -> bool:
    # Columns missing from some rows of a DataFrame arrive as None or NaN.
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def number(name: str, value: Any, low: float, high: float, *, integer: bool = False,
           low_open: bool = False) -> float:  # fmt: skip
    """``value`` as a finite number in [low, high] (or (low, high] with ``low_open``), or a
    BadRequestError naming the field: NaN, infinities and booleans are refused."""
    interval = f"{'(' if low_open else '['}{_shown(low)}, {_shown(high)}]"
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequestError(f"'{name}' must be {kind} in {interval}; got {value!r}")
    if not math.isfinite(value) or (integer and value != int(value)):
        raise BadRequestError(f"'{name}' must be {kind} in {interval}; got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise BadRequestError(f"'{name}' must be {kind} in {interval}; got {value!r}")
    return value


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def request_rows(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        # A field some rows leave out arrives as NaN (or None) in those rows, beside the values
        # the other rows give. A column of NaN only was sent as NaN (pandas makes no column that
        # no row names), and is kept, for the option checks to refuse.
        records = model_input.to_dict(orient="records")
        sent_nan = {column for column in model_input.columns
                    if not any(present(record[column]) for record in records)
                    and any(record[column] is not None for record in records)}  # fmt: skip
        return [
            {key: value for key, value in row.items() if present(value) or key in sent_nan}
            for row in records
        ]
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        return model_input
    raise BadRequestError(
        "Expected a chat request {'messages': [...]}, a prompt request {'prompt': '...'}, "
        f"or a list of them; got {type(model_input).__name__}"
    )


def chat_messages(raw: Any) -> list[dict[str, str]]:
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


def stop_strings(raw: Any) -> list[str]:
    if not present(raw):
        return []
    stops = [raw] if isinstance(raw, str) else list(raw)
    if not all(isinstance(stop, str) and stop for stop in stops):
        raise BadRequestError("'stop' must be a non-empty string or a list of them")
    return stops


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could still grow into a stop string; a stream
    holds them back so that a stop string never leaks out."""
    return max(
        (size for stop in stops for size in range(min(len(stop) - 1, len(text)), 0, -1)
         if text.endswith(stop[:size])),
        default=0,
    )  # fmt: skip

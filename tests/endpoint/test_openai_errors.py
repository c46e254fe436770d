"""The OpenAI endpoint's answers when a model refuses, fails, is slow or loses its client, seen
through the real `openai` client against the real app on loopback, with a stand-in model that
injects each failure where a real model raises it.

The stand-in keeps to what `mlflow.pyfunc.PyFuncModel` documents and does:
- ``metadata.flavors["python_function"]["streamable"]`` says whether it streams (MLflow's
  `load_model` reads the same flag, mlflow/pyfunc/__init__.py `_load_pyfunc`/`streamable`);
- ``predict`` returns a list with one chat completion per request (docs/serving.md);
- ``predict_stream`` returns a generator, so its errors arise at the first ``next()``
  (`PyFuncModel.predict_stream` wraps the model's own in a generator; docs/architecture.md);
- that generator sets a context variable at its first chunk and resets it when it ends or is
  closed (`_gen_with_context` holds `set_prediction_context` across its yields), which raises
  ``ValueError`` if the end runs in another `contextvars.Context` than the start;
- refusals are MLflow exceptions whose error code carries the HTTP status: the ONNX model's full
  queue is ``TEMPORARILY_UNAVAILABLE`` (503) and a refused request ``INVALID_PARAMETER_VALUE``
  (400), as `llm_packager/serving/requests.py` raises them.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import uvicorn
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from benchmarks.common import free_loopback_port
from llm_packager.endpoint.app import build_app

SERVED = "stand-in@champion"
# Stands for MLflow's prediction context, set and reset around a stream as `predict_stream` does.
_PREDICTION_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("prediction_context")
HELLO = [{"role": "user", "content": "Hello"}]
TEXT = "one two three four"


class _Schema:
    def input_names(self) -> list[str]:
        # The chat signature's fields, as both flavors log them (onnx_build.chat_signature).
        return ["messages", "temperature", "max_tokens", "stop", "n", "stream", "top_p", "seed"]


class _Metadata:
    def __init__(self, streamable: bool) -> None:
        self.flavors = {"python_function": {"streamable": streamable}}

    def get_input_schema(self) -> _Schema:
        return _Schema()


def _completion(text: str) -> dict[str, Any]:
    words = len(text.split())
    return {
        "id": "chatcmpl-standin", "object": "chat.completion", "created": 1, "model": "own name",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": words, "total_tokens": words + 1},
    }  # fmt: skip


def _chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 1,
            "model": "own name",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip


class StandInModel:
    """A chat model whose behaviour a test sets: ``fault`` is raised by ``predict`` and at the
    first chunk, ``fail_after`` chunks in a stream raise ``RuntimeError``, ``delay`` seconds pass
    before each answer or chunk. It records the most calls inside it at once, and whether a
    stream was closed before its end."""

    def __init__(self, *, streamable: bool = True) -> None:
        self.metadata = _Metadata(streamable)
        self.fault: Exception | None = None
        self.fail_after: int | None = None
        self.delay = 0.0
        self.barrier: threading.Barrier | None = None
        self.closed_early = threading.Event()
        self.requests: list[dict[str, Any]] = []

    def predict(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        self.requests.append(request)
        if self.barrier is not None:
            self.barrier.wait()  # passes only when every caller is inside at once
        if self.fault is not None:
            raise self.fault
        time.sleep(self.delay)
        return [_completion(TEXT)]

    def predict_stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.requests.append(request)

        def chunks() -> Iterator[dict[str, Any]]:
            if self.fault is not None:
                raise self.fault
            token = _PREDICTION_CONTEXT.set(request)
            finished = False
            try:
                yield _chunk({"role": "assistant", "content": ""})
                words = ((TEXT + " ") * (50 if self.delay else 1)).split()
                for index, word in enumerate(words):
                    if self.fail_after is not None and index == self.fail_after:
                        raise RuntimeError("the decoder failed")
                    time.sleep(self.delay)
                    yield _chunk({"content": (" " if index else "") + word})
                finished = True
                yield {**_chunk({}, "stop"), "usage": _completion(TEXT)["usage"]}
            finally:
                _PREDICTION_CONTEXT.reset(token)
                if not finished:
                    self.closed_early.set()

        return chunks()


@pytest.fixture
def serve():
    """``serve(model)`` runs the endpoint app in this process on a free loopback port and
    returns an `openai.OpenAI` client for it, without retries (a retried 503 would hide it)."""
    servers = []

    def start(model: StandInModel) -> openai.OpenAI:
        executor = concurrent.futures.ThreadPoolExecutor(16)
        port = free_loopback_port()
        config = uvicorn.Config(build_app(model, SERVED, executor), host="127.0.0.1", port=port,
                                log_level="warning")  # fmt: skip
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread, executor))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the endpoint did not start"
            time.sleep(0.05)
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                             max_retries=0, timeout=30)  # fmt: skip

    yield start
    for server, thread, executor in servers:
        server.should_exit = True
        thread.join(10)
        executor.shutdown(wait=False, cancel_futures=True)


def _error(raised: pytest.ExceptionInfo) -> dict[str, Any]:
    return raised.value.body


def test_a_busy_model_answers_503_whole_and_streamed(serve):
    model = StandInModel()
    model.fault = MlflowException("The model is busy: retry shortly.", TEMPORARILY_UNAVAILABLE)
    client = serve(model)
    with pytest.raises(openai.InternalServerError) as whole:
        client.chat.completions.create(model=SERVED, messages=HELLO)
    with pytest.raises(openai.InternalServerError) as streamed:
        client.chat.completions.create(model=SERVED, messages=HELLO, stream=True)
    for raised in (whole, streamed):
        assert raised.value.status_code == 503
        assert _error(raised)["message"] == "The model is busy: retry shortly."
        assert _error(raised)["type"] == "server_error"


def test_a_request_the_model_refuses_is_a_400_with_its_message(serve):
    model = StandInModel()
    model.fault = MlflowException("'n' must be from 1 to 8; got 9", INVALID_PARAMETER_VALUE)
    client = serve(model)
    with pytest.raises(openai.BadRequestError, match="'n' must be from 1 to 8") as raised:
        client.chat.completions.create(model=SERVED, messages=HELLO, n=9, stream=True)
    assert _error(raised)["type"] == "invalid_request_error"


def _logged_error_id(message: str, caplog: pytest.LogCaptureFixture) -> str:
    """The error id a 500's message quotes, checked against the traceback the server logged."""
    found = re.search(r"error id ([0-9a-f]{12})", message)
    assert found, message
    (record,) = [r for r in caplog.records if found.group(1) in r.getMessage()]
    assert record.levelname == "ERROR" and record.exc_info is not None
    return found.group(1)


def test_a_model_crash_is_a_500_naming_its_type_and_keeping_its_text_in_the_log(serve, caplog):
    model = StandInModel()
    model.fault = ValueError("weights are gone from /secret/path?token=abc")
    client = serve(model)
    with pytest.raises(openai.InternalServerError, match="ValueError; error id") as raised:
        client.chat.completions.create(model=SERVED, messages=HELLO)
    assert raised.value.status_code == 500
    message = _error(raised)["message"]
    assert "secret" not in message and "token" not in message
    error_id = _logged_error_id(message, caplog)
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert "weights are gone from /secret/path?token=abc" in str(record.exc_info[1])


def test_a_failure_mid_stream_reaches_the_client_as_an_error_event(serve, caplog):
    model = StandInModel()
    model.fail_after = 2
    client = serve(model)
    received = []
    with pytest.raises(openai.APIError, match="RuntimeError; error id") as raised:
        for chunk in client.chat.completions.create(model=SERVED, messages=HELLO, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one two"
    assert "the decoder failed" not in raised.value.message
    _logged_error_id(raised.value.message, caplog)


@pytest.mark.parametrize(
    ("arguments", "param", "phrase"),
    [
        ({"max_tokens": 0}, "max_tokens", "'max_tokens' must be at least 1"),
        ({"temperature": 2.5}, "temperature", "'temperature' must be between 0 and 2"),
        ({"top_p": -0.1}, "top_p", "'top_p' must be between 0 and 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "'stop' must be a string or a list"),
        ({"logprobs": True}, "logprobs", "'logprobs' is not supported by this model"),
        ({"messages": []}, "messages", "'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "'messages[0].role'"),
    ],
)  # fmt: skip
def test_a_bad_request_is_refused_before_the_model_with_a_400_naming_the_field(
    serve, arguments, param, phrase
):
    model = StandInModel()
    client = serve(model)
    with pytest.raises(openai.BadRequestError, match=re.escape(phrase)) as raised:
        client.chat.completions.create(**{"model": SERVED, "messages": HELLO, **arguments})
    assert _error(raised)["param"] == param
    assert model.requests == []


def test_non_finite_numbers_are_refused(serve):
    # The openai client cannot send NaN (its JSON encoder refuses it), but Python's json module
    # parses it: a raw request must not slip one through to the sampler.
    client = serve(StandInModel())
    for number in ("NaN", "Infinity", "-Infinity"):
        body = '{"messages": [{"role": "user", "content": "Hi"}], "temperature": ' + number + "}"
        request = urllib.request.Request(f"{client.base_url}chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert raised.value.code == 400
        assert json.loads(raised.value.read())["error"]["message"] == (
            f"The body is not valid JSON: {number} is not a JSON number."
        )


def test_an_unknown_model_is_a_404_model_not_found(serve):
    client = serve(StandInModel())
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert _error(raised)["code"] == "model_not_found"
    assert _error(raised)["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert client.models.retrieve(SERVED).id == SERVED


def test_a_model_that_cannot_stream_answers_one_chunk_and_usage(serve):
    model = StandInModel(streamable=False)
    client = serve(model)
    stream = client.chat.completions.create(
        model=SERVED, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text_chunks = [chunk for chunk in chunks if chunk.choices]
    assert len(text_chunks) == 1
    assert text_chunks[0].choices[0].delta.content == TEXT
    assert text_chunks[0].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 4
    # Usage only when asked for, in a last chunk without choices, as OpenAI sends it.
    plain = list(client.chat.completions.create(model=SERVED, messages=HELLO, stream=True))
    assert [chunk.usage for chunk in plain] == [None]


def test_concurrent_requests_are_inside_the_model_at_once(serve):
    model = StandInModel()
    model.barrier = threading.Barrier(4, timeout=10)
    client = serve(model)
    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        calls = [clients.submit(client.chat.completions.create, model=SERVED, messages=HELLO)
                 for _ in range(4)]  # fmt: skip
        answers = [call.result() for call in calls]
    assert [answer.choices[0].message.content for answer in answers] == [TEXT] * 4
    assert [answer.model for answer in answers] == [SERVED] * 4


def test_concurrent_streams_each_arrive_whole(serve):
    # Four streams interleave their chunks on the endpoint's threads, so a stream's chunks are
    # made on different threads: each must still end cleanly in the model.
    model = StandInModel()
    model.delay = 0.002
    client = serve(model)

    def streamed_text() -> str:
        stream = client.chat.completions.create(model=SERVED, messages=HELLO, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        texts = [call.result() for call in [clients.submit(streamed_text) for _ in range(4)]]
    assert texts == [" ".join([TEXT] * 50)] * 4
    assert not model.closed_early.is_set()


def test_a_stream_dropped_by_its_client_is_closed_in_the_model(serve):
    model = StandInModel()
    model.delay = 0.02  # 200 chunks: seconds of stream left when the client goes
    client = serve(model)
    stream = client.chat.completions.create(model=SERVED, messages=HELLO, stream=True)
    next(iter(stream))
    next(iter(stream))
    stream.close()
    assert model.closed_early.wait(5), "the model's stream was not closed"


def test_a_timeout_is_an_openai_error_object(serve, monkeypatch):
    # MLflow's scoring server reads its timeout when the app is built and answers 504 in plain
    # text; the endpoint turns that into an error object.
    monkeypatch.setenv(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name, "1")
    model = StandInModel()
    model.delay = 3
    client = serve(model)
    with pytest.raises(openai.APIStatusError, match="exceeded the server's --timeout") as raised:
        client.chat.completions.create(model=SERVED, messages=HELLO)
    assert raised.value.status_code == 504


def test_a_stream_that_outlasts_the_timeout_ends_with_a_504_event_and_is_closed(serve, monkeypatch):
    # MLflow's timeout covers a request until its status line; the endpoint holds the rest of a
    # stream to the same --timeout, counted from the request's arrival.
    monkeypatch.setenv(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name, "5")
    model = StandInModel()
    model.delay = 0.1  # 200 chunks: 20 s of stream
    client = serve(model)
    received = []
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="exceeded the server's --timeout") as raised:
        for chunk in client.chat.completions.create(model=SERVED, messages=HELLO, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    # An error event mid-stream, not the status line's 504 (APIStatusError) before it.
    assert type(raised.value) is openai.APIError
    assert time.monotonic() - started < 15
    assert 0 < len(received) < 200
    assert model.closed_early.wait(5), "the model's stream was not closed"

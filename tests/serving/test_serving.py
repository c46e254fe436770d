"""`mlflow models serve` on loopback for both registered models, with good and bad requests."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest

from benchmarks.common import local_server
from llm_packager.keys import MODEL_URI_TAG
from tests.support import REFERENCE_PROMPT_REQUEST, project_environment, tracking_uri

pytestmark = pytest.mark.slow

NAME = "serving-test"
CHAT = {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}
_START_SECONDS = 120


ALIAS_OF_STEP = {"log_onnx": "champion", "log_transformers": "challenger"}


@pytest.fixture(scope="module")
def registered(logged_models) -> str:
    """Both logged models registered under aliases, as the register step leaves a champion and a
    challenger (which wins is the evaluation's business, tested with the register step)."""
    uri, runs = logged_models
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(NAME)
    for step, alias in ALIAS_OF_STEP.items():
        model_uri = client.get_run(runs[step]).data.tags[MODEL_URI_TAG]
        with tracking_uri(uri):
            version = mlflow.register_model(model_uri, NAME).version
        client.set_registered_model_alias(NAME, alias, version)
    return uri


def _serve(uri: str, alias: str, tmp_path) -> Iterator[str]:
    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@{alias}",
                "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--timeout", "120"]  # fmt: skip

    with local_server(
        command, "/ping", environment=project_environment(MLFLOW_TRACKING_URI=uri),
        start_seconds=_START_SECONDS, log=tmp_path / f"serve-{alias}.log", cwd=tmp_path,
    ) as base:  # fmt: skip
        yield base


@pytest.fixture(scope="module")
def onnx_server(registered, tmp_path_factory) -> Iterator[str]:
    yield from _serve(registered, ALIAS_OF_STEP["log_onnx"], tmp_path_factory.mktemp("serve-onnx"))


@pytest.fixture(scope="module")
def transformers_server(registered, tmp_path_factory) -> Iterator[str]:
    yield from _serve(
        registered, ALIAS_OF_STEP["log_transformers"], tmp_path_factory.mktemp("serve-transformers")
    )


def _post(
    base: str, body: bytes | dict, content_type: str | None = "application/json"
) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(f"{base}/invocations", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        answer = error.read()
        try:
            return error.code, json.loads(answer)
        except ValueError:  # MLflow answers 415 in plain text
            return error.code, {"message": answer.decode()}


def _check_completion(body) -> None:
    completion = body[0] if isinstance(body, list) else body
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert completion["usage"]["total_tokens"] > 0


def test_transformers_model_answers_the_openai_chat_body(transformers_server):
    status, body = _post(transformers_server, {**CHAT, "max_tokens": 8})
    assert status == 200
    _check_completion(body)


def test_onnx_model_answers_chat_and_reference_prompt(onnx_server):
    status, body = _post(onnx_server, CHAT)
    assert status == 200
    _check_completion(body)
    status, body = _post(onnx_server, {**REFERENCE_PROMPT_REQUEST, "max_tokens": 8})
    assert status == 200
    text = body[0] if isinstance(body, list) else body
    assert isinstance(text, str)


# Hostile requests, what each model answers, and a phrase of the message. The ONNX model checks
# every field itself. The transformers flavor has no hook for that: MLflow answers its errors,
# and the README's serving section lists where it differs (a 500, a stack trace, a 200).
_NO_CONTENT_TYPE = object()
HOSTILE = {
    "malformed JSON": (b'{"messages": [', 400, 400, "Invalid input"),
    "empty messages": ({"messages": []}, 400, 500, "empty"),
    "max_tokens -5": ({**CHAT, "max_tokens": -5}, 400, 400, "max_tokens"),
    "max_tokens 'x'": ({**CHAT, "max_tokens": "x"}, 400, 400, "Failed to enforce schema"),
    "content not a string": ({"messages": [{"role": "user", "content": 42}]}, 400, 400,
                             "Failed to enforce schema"),
    "no role": ({"messages": [{"content": "hi"}]}, 400, 400, "Failed to enforce schema"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "word " * 3000}]},
                                400, 200, "exceeds the model's context length"),
    "n 9": ({**CHAT, "n": 9}, 400, 400, "'n'"),
    "temperature 'hot'": ({**CHAT, "temperature": "hot"}, 400, 400, "Failed to enforce schema"),
    "temperature -1": ({**CHAT, "temperature": -1}, 400, 400, "Failed to enforce schema"),
    "stop 5": ({**CHAT, "stop": 5}, 400, 400, "Failed to enforce schema"),
    "stop [5]": ({**CHAT, "stop": [5]}, 400, 400, "Failed to enforce schema"),
    "no Content-Type": (_NO_CONTENT_TYPE, 415, 415, "only supports the following content types"),
}  # fmt: skip
# Where MLflow adds a stack trace to the transformers model's answer: an error raised inside the
# pipeline rather than by MLflow's schema check.
TRANSFORMERS_STACK_TRACE = {"max_tokens -5"}


def _send_hostile(base: str, case: str) -> tuple[int, object]:
    body = HOSTILE[case][0]
    if body is _NO_CONTENT_TYPE:
        return _post(base, CHAT, content_type=None)
    return _post(base, body)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_onnx_model_answers_every_hostile_request_4xx_without_a_stack_trace(onnx_server, case):
    _, expected, _, phrase = HOSTILE[case]
    status, answer = _send_hostile(onnx_server, case)
    assert status == expected
    assert phrase in answer["message"]
    assert "stack_trace" not in answer
    assert "Traceback" not in json.dumps(answer)
    status, good = _post(onnx_server, CHAT)
    assert status == 200
    _check_completion(good)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_transformers_model_answers_hostile_requests_as_the_readme_says(transformers_server, case):
    _, _, expected, phrase = HOSTILE[case]
    status, answer = _send_hostile(transformers_server, case)
    assert status == expected, answer
    if status == 200:
        # MLflow's transformers pipeline truncates nothing and answers; documented in the README.
        _check_completion(answer)
    elif case in TRANSFORMERS_STACK_TRACE:
        assert "unexpected error while evaluating the model" in answer["message"]
        assert "Traceback" in answer["stack_trace"]
    else:
        assert phrase in answer["message"]
        assert "stack_trace" not in answer
    status, good = _post(transformers_server, {**CHAT, "max_tokens": 8})
    assert status == 200
    _check_completion(good)


def test_onnx_concurrent_requests_get_their_solo_answers_and_a_bad_one_fails_alone(onnx_server):
    good = [{"messages": [{"role": "user", "content": text}], "max_tokens": tokens}
            for text, tokens in (("What is 2 + 2?", 12), ("Name a colour.", 3), ("Hi", 24),
                                 ("Write a poem about the sea.", 16), ("Why?", 1),
                                 ("Count to ten.", 20))]  # fmt: skip
    bad = [{**CHAT, "max_tokens": -5}, {"messages": []}]
    solo = [_post(onnx_server, request) for request in good]
    assert {status for status, _ in solo} == {200}
    # The bad requests go in among the good ones, all at once.
    mixed = good[:3] + bad[:1] + good[3:] + bad[1:]
    with ThreadPoolExecutor(max_workers=len(mixed)) as pool:
        answers = list(pool.map(lambda request: _post(onnx_server, request), mixed))
    together = answers[:3] + answers[4:7]
    for (status, body), (_, alone) in zip(together, solo, strict=True):
        assert status == 200
        assert body[0]["choices"] == alone[0]["choices"]
        assert body[0]["usage"] == alone[0]["usage"]
    assert [answers[3][0], answers[7][0]] == [400, 400]


def test_the_local_scoring_server_answers_a_stream_request_whole(onnx_server):
    # MLflow's scoring server has no streaming response; the README says so.
    status, body = _post(onnx_server, {**CHAT, "max_tokens": 8, "stream": True})
    assert status == 200
    _check_completion(body)

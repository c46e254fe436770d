"""`python -m llm_packager.endpoint` as a process, serving each flavor of the tiny model
registered as `champion`, chatted with by the real `openai` client: whole and streamed answers,
`/v1/models`, bad requests and concurrent streams."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import mlflow
import openai
import pytest

from benchmarks.common import local_server
from llm_packager.keys import MODEL_URI_TAG
from llm_packager.project import PROJECT_DIR
from tests.support import project_environment, tracking_uri

pytestmark = pytest.mark.slow

_START_SECONDS = 180
# Greedy (no temperature), and long enough for the ONNX model to stream many chunks.
MAX_TOKENS = 24
PROMPTS = [
    "What is the capital of Spain?",
    "Name three colours.",
    "Count from one to five.",
    "Tell me a joke about atoms.",
]


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def champions(logged_models) -> str:
    """Each logged model of the session's tiny build registered as `openai-<log step>@champion`;
    yields the store's tracking URI."""
    uri, runs = logged_models
    with tracking_uri(uri):
        client = mlflow.MlflowClient()
        for step in ("log_onnx", "log_transformers"):
            model_uri = client.get_run(runs[step]).data.tags[MODEL_URI_TAG]
            version = mlflow.register_model(model_uri, f"openai-{step}")
            client.set_registered_model_alias(f"openai-{step}", "champion", version.version)
    return uri


def _serve(uri: str, name: str, log) -> Iterator[openai.OpenAI]:
    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "llm_packager.endpoint", "-m", f"models:/{name}@champion",
                "--host", "127.0.0.1", "--port", str(port), "--timeout", "120"]  # fmt: skip

    environment = project_environment(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(PROJECT_DIR))
    with local_server(command, "/ping", environment=environment, start_seconds=_START_SECONDS,
                      log=log, cwd=log.parent) as base:  # fmt: skip
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module", params=["log_onnx", "log_transformers"])
def served(request, champions, tmp_path_factory) -> Iterator[tuple[openai.OpenAI, str]]:
    """The endpoint serving one flavor's champion: (client, served model id). One server per
    flavor for the whole module."""
    name = f"openai-{request.param}"
    log = tmp_path_factory.mktemp(f"endpoint-{request.param}") / "endpoint.log"
    for client in _serve(champions, name, log):
        yield client, f"{name}@champion"


def _whole(client: openai.OpenAI, model: str, prompt: str) -> str:
    answer = client.chat.completions.create(
        model=model, messages=_messages(prompt), max_tokens=MAX_TOKENS
    )
    assert answer.object == "chat.completion"
    assert answer.model == model
    assert answer.usage.completion_tokens <= MAX_TOKENS
    return answer.choices[0].message.content


def _streamed(client: openai.OpenAI, model: str, prompt: str) -> tuple[str, int]:
    """The text a stream adds up to, and how many chunks carried text."""
    pieces = []
    stream = client.chat.completions.create(
        model=model, messages=_messages(prompt), max_tokens=MAX_TOKENS, stream=True
    )
    finish_reasons = []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert finish_reasons in (["stop"], ["length"])
    return "".join(pieces), len(pieces)


def test_streamed_text_equals_the_whole_answer(served):
    client, model = served
    whole = _whole(client, model, PROMPTS[0])
    streamed, pieces = _streamed(client, model, PROMPTS[0])
    assert whole  # the tiny random model still answers tokens
    assert streamed == whole
    # The ONNX model streams token by token; the transformers flavor cannot, so it answers one
    # chunk.
    assert pieces > 1 if model.startswith("openai-log_onnx") else pieces == 1


def test_models_lists_the_served_model(served):
    client, model = served
    assert [card.id for card in client.models.list()] == [model]


def test_a_bad_request_raises_bad_request_error_with_its_message(served):
    client, model = served
    with pytest.raises(openai.BadRequestError, match="'max_tokens' must be at least 1") as raised:
        client.chat.completions.create(model=model, messages=_messages("Hi"), max_tokens=0)
    assert raised.value.body["param"] == "max_tokens"
    # A request only the model itself refuses, its message passed on: the ONNX model's cap on
    # `n` (its message names the field), MLflow's params check for the transformers pipeline.
    phrase = "'n' must be" if "onnx" in model else "not valid for pipeline"
    with pytest.raises(openai.BadRequestError, match=phrase):
        client.chat.completions.create(model=model, messages=_messages("Hi"), n=9, stream=True)


def test_an_unknown_model_raises_not_found(served):
    client, _ = served
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=_messages("Hi"))


def test_concurrent_streams_each_equal_their_solo_answer(served):
    client, model = served
    solo = {prompt: _whole(client, model, prompt) for prompt in PROMPTS}
    with ThreadPoolExecutor(len(PROMPTS)) as clients:
        streams = [clients.submit(_streamed, client, model, prompt) for prompt in PROMPTS]
        streamed = {
            prompt: stream.result()[0] for prompt, stream in zip(PROMPTS, streams, strict=True)
        }
    assert streamed == solo

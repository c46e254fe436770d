"""The ONNX pyfunc chat model: parity with transformers, both request shapes, bad requests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from llm_packager.choices import ExecutionProvider, OnnxPrecision, OnnxSource
from llm_packager.config.specs import LogOnnxParameters
from llm_packager.models.chat import check_chat_completion
from llm_packager.models.onnx_build import build_onnx_model
from llm_packager.models.parity import (
    PARITY_CHATS,
    chat_token_ids,
    greedy_onnx,
    greedy_transformers,
)
from llm_packager.models.served_code import SERVED_PACKAGE
from steps.fetch_model import fetch_model
from steps.log_onnx import log_onnx
from tests.support import (
    REFERENCE_PROMPT_REQUEST,
    local_fetch_parameters,
    project_environment,
    tracking_uri,
)

PARITY_TOKENS = 20
CAP = 64
# The served model's modules, each of which must come from the model's own logged copy.
SERVED_MODULES = ("keys", "requests", "sequence", "generators", "shared_rows", "decode_loop")


@pytest.fixture(scope="module")
def fp32_onnx(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("onnx-fp32")
    return build_onnx_model(
        tiny_model_dir, folder / "model", precision=OnnxPrecision.fp32,
        execution_provider=ExecutionProvider.cpu,
        extra_options={}, log_path=folder / "builder.log",
    )  # fmt: skip


@pytest.fixture(scope="module")
def logged_fp32(tiny_model_dir, tmp_path_factory):
    """The tiny model logged by the log_onnx step at fp32, and its tracking URI."""
    root = tmp_path_factory.mktemp("onnx-tracking")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_uri(uri):
        # An explicit experiment id rather than set_experiment, which would outlive this fixture;
        # its artifacts stay under the fixture's folder, not in the working folder's mlruns/.
        experiment_id = mlflow.MlflowClient().create_experiment(
            "onnx-model-test", artifact_location=(root / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment_id) as fetch_run:
            fetch_model(local_fetch_parameters(tiny_model_dir), fetch_run.info.run_id)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            result = log_onnx(
                LogOnnxParameters(fetch_model_run_id=fetch_run.info.run_id,
                                  precision=OnnxPrecision.fp32, max_tokens_cap=CAP,
                                  max_new_tokens=16),
                run.info.run_id,
            )  # fmt: skip
        yield uri, run.info.run_id, result


@pytest.fixture(scope="module")
def model(logged_fp32):
    uri, _, result = logged_fp32
    with tracking_uri(uri):
        return mlflow.pyfunc.load_model(result.model_uri)


def _chat(content: str, **options) -> dict:
    return {"messages": [{"role": "user", "content": content}], **options}


@pytest.mark.slow
def test_fp32_greedy_tokens_match_transformers_exactly(tiny_model_dir, fp32_onnx):
    prompts = chat_token_ids(tiny_model_dir)
    expected = greedy_transformers(tiny_model_dir, prompts, PARITY_TOKENS)
    assert greedy_onnx(fp32_onnx, prompts, PARITY_TOKENS) == expected
    assert all(len(tokens) > 0 for tokens in expected)
    # Padded on the right into one Generator (as the served model's Generators decoder does for
    # CUDA builds and batching: generators): the same tokens.
    assert len({len(ids) for ids in prompts}) > 1
    assert greedy_onnx(fp32_onnx, prompts, PARITY_TOKENS, batch_size=3) == expected


def test_prompts_decoded_in_one_left_padded_batch_give_the_one_by_one_answers(tiny_model_dir):
    # The four chats differ in length (one has a system turn), so the batch pads three of them.
    prompts = chat_token_ids(tiny_model_dir)
    assert len({len(ids) for ids in prompts}) > 1
    one_by_one = greedy_transformers(tiny_model_dir, prompts, PARITY_TOKENS)
    assert greedy_transformers(tiny_model_dir, prompts, PARITY_TOKENS, batch_size=3) == one_by_one


@pytest.mark.slow
def test_fp32_pyfunc_text_matches_transformers_text(tiny_model_dir, model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end_ids = set(tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"]))
    prompts = chat_token_ids(tiny_model_dir)
    expected = greedy_transformers(tiny_model_dir, prompts, PARITY_TOKENS)
    compared = 0
    for chat, tokens in zip(PARITY_CHATS, expected, strict=True):
        answer = model.predict({"messages": list(chat), "max_tokens": PARITY_TOKENS})[0]
        content_ids = [token for token in tokens if token not in end_ids]
        assert answer["usage"]["completion_tokens"] == len(content_ids)
        # Random weights emit byte tokens that do not form valid UTF-8; transformers shows them
        # as U+FFFD, onnxruntime-genai drops them. Up to the first such byte the text must agree.
        valid_prefix = tokenizer.decode(content_ids).split("\ufffd")[0]
        assert answer["choices"][0]["message"]["content"].startswith(valid_prefix)
        compared += len(valid_prefix)
    assert compared >= 10


def test_step_logged_params_metrics_and_samples(logged_fp32):
    uri, run_id, result = logged_fp32
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    import onnxruntime_genai

    assert run.data.params["onnxruntime_genai_version"] == onnxruntime_genai.__version__
    assert run.data.metrics["onnx_size_bytes"] == result.onnx_size_bytes > 0
    # fp32 ONNX decodes exactly like transformers, so the check agrees fully.
    assert run.data.metrics["greedy_token_agreement"] == 1.0
    assert json.loads(run.data.tags["llm_packager.outputs"]) == {"model": result.model_uri}
    names = {info.path for info in client.list_artifacts(run_id)}
    assert {"sample_completion.json", "sample_prompt_answer.json", "logs"} <= names


def test_fresh_process_without_pickle_answers_both_shapes_and_a_batch(logged_fp32, tmp_path):
    uri, _, result = logged_fp32
    script = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "chat = {'messages': [{'role': 'user', 'content': 'What is the capital of Spain?'}]}\n"
        "prompt = json.loads(sys.argv[2])\n"
        "batch = [dict(chat, max_tokens=n) for n in (3, 4, 5)]\n"
        "print(json.dumps({'chat': model.predict(chat), 'prompt': model.predict(prompt),"
        " 'batch': model.predict(batch)}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, result.model_uri, json.dumps(REFERENCE_PROMPT_REQUEST)],
        env=project_environment(
            MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"
        ),
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    answers = json.loads(completed.stdout.strip().splitlines()[-1])
    check_chat_completion(answers["chat"][0])
    assert len(answers["prompt"]) == 1 and isinstance(answers["prompt"][0], str)
    assert len(answers["batch"]) == 3
    for completion, cap in zip(answers["batch"], (3, 4, 5), strict=True):
        check_chat_completion(completion, max_tokens=cap)


# Run with `python -I` from an empty folder: no PYTHONPATH, no working directory on sys.path. The
# script then drops whatever else could still find the project (a sys.path entry holding it, an
# editable install's finder), checks that it cannot be found, and refuses any later import of it.
_WITHOUT_THE_PROJECT = """
import importlib.abc, importlib.util, json, os, sys
from pathlib import Path

sys.path[:] = [entry for entry in sys.path
               if not (Path(entry or os.getcwd()) / "llm_packager").is_dir()]
sys.meta_path[:] = [finder for finder in sys.meta_path
                    if "editable" not in type(finder).__module__.lower()]
assert importlib.util.find_spec("llm_packager") is None, "the project is still importable"


class RefuseTheProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llm_packager":
            raise ImportError(f"the served model imported {name}")


sys.meta_path.insert(0, RefuseTheProject())
import mlflow

model_dir = Path(sys.argv[1]).resolve()
model = mlflow.pyfunc.load_model(str(model_dir))
answer = model.predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
served = {name: str(Path(module.__file__).resolve()) for name, module in sys.modules.items()
          if name.split(".")[0] == "llm_packager_serving"}
print(json.dumps({"answer": answer, "served": served,
                  "project": sorted(n for n in sys.modules if n.split(".")[0] == "llm_packager"),
                  "model_dir": str(model_dir)}))
"""


def test_the_model_loads_and_answers_where_the_project_cannot_be_imported(logged_fp32, tmp_path):
    uri, _, result = logged_fp32
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri=result.model_uri, dst_path=str(tmp_path / "download"), tracking_uri=uri
    )
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-I", "-c", _WITHOUT_THE_PROJECT, downloaded],
        env={**environment, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"},
        cwd=empty, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    check_chat_completion(found["answer"][0], max_tokens=4)
    assert found["project"] == []
    # The decoders, the loop, the request checks and the keys all ran from the model's own copy.
    logged_code = Path(found["model_dir"]) / "code" / SERVED_PACKAGE
    assert {f"{SERVED_PACKAGE}.{module}" for module in SERVED_MODULES} <= set(found["served"])
    assert all(Path(file).is_relative_to(logged_code) for file in found["served"].values())


def test_each_model_loaded_in_one_process_runs_its_own_logged_code(logged_fp32, model, tmp_path):
    """A second model loaded where the project is importable, and after another model's serving
    package is already imported, still runs the code logged with it."""
    uri, _, result = logged_fp32
    downloaded = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=result.model_uri, dst_path=str(tmp_path), tracking_uri=uri
    )).resolve()  # fmt: skip
    second = mlflow.pyfunc.load_model(str(downloaded))

    def decoder_file(loaded) -> Path:
        # The file the decoder's code was compiled from, whatever sys.modules now holds.
        step = type(loaded.unwrap_python_model()._loop._rows).step
        return Path(step.__code__.co_filename).resolve()

    assert decoder_file(second).is_relative_to(downloaded / "code" / SERVED_PACKAGE)
    assert not decoder_file(model).is_relative_to(downloaded)
    request = _chat("What is 2 + 2?", max_tokens=6)
    assert second.predict(request)[0]["choices"] == model.predict(request)[0]["choices"]


def test_max_tokens_counts_new_tokens_only(model):
    request = _chat("Tell me a joke about atom")
    unlimited = model.predict(dict(request, max_tokens=CAP))[0]["usage"]
    # The prompt is longer than the limit, and the answer would be too without it.
    assert unlimited["prompt_tokens"] > 5 and unlimited["completion_tokens"] > 5
    answer = model.predict(dict(request, max_tokens=5))[0]
    assert answer["usage"]["completion_tokens"] == 5
    assert answer["usage"]["prompt_tokens"] == unlimited["prompt_tokens"]
    assert answer["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_the_answer(model):
    greedy = model.predict(_chat("Tell me a joke about atom", max_tokens=20))[0]
    text = greedy["choices"][0]["message"]["content"]
    assert len(text) >= 6
    stop = text[3:5]
    stopped = model.predict(_chat("Tell me a joke about atom", max_tokens=20, stop=[stop]))[0]
    assert stopped["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_greedy_unless_sampling_is_asked_for(model):
    request = _chat("Define entropy in one line.", max_tokens=12)
    assert model.predict(request)[0]["choices"] == model.predict(request)[0]["choices"]
    sampled = model.predict(dict(request, temperature=1.0, n=4, seed=7))[0]
    assert len(sampled["choices"]) == 4
    assert len({choice["message"]["content"] for choice in sampled["choices"]}) > 1
    # A seed makes sampling reproducible, so this test cannot pass or fail by chance.
    assert (
        model.predict(dict(request, temperature=1.0, n=4, seed=7))[0]["choices"]
        == (sampled["choices"])
    )


def test_concurrent_requests_do_not_share_state(model):
    requests = [_chat(text, max_tokens=10) for text in ("What is 2 + 2?", "Name a colour.") * 3]
    sequential = [model.predict(request)[0]["choices"] for request in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda request: model.predict(request)[0]["choices"], requests))
    assert concurrent == sequential


def test_a_batch_answers_each_row_as_it_would_alone(model):
    # Every row names the same fields: MLflow's schema check refuses an integer or list column
    # that some rows of a batch leave out.
    rows = [
        _chat("What is the capital of Spain?", max_tokens=12, n=1),
        _chat("Hi", max_tokens=5, n=1),
        _chat("Write a long, detailed poem about the sea and its many moods.", max_tokens=16, n=1),
        _chat("Tell me a joke about atom", max_tokens=20, n=2),
    ]
    alone = [model.predict(row)[0] for row in rows]
    together = model.predict(rows)
    assert [answer["choices"] for answer in together] == [answer["choices"] for answer in alone]
    assert [answer["usage"] for answer in together] == [answer["usage"] for answer in alone]
    # A stop string ends the rows whose answers contain it, and only where each alone would end.
    stop = alone[3]["choices"][0]["message"]["content"][3:5]
    stopped_rows = [dict(row, stop=[stop]) for row in rows]
    stopped = [answer["choices"] for answer in model.predict(stopped_rows)]
    assert stopped == [model.predict(row)[0]["choices"] for row in stopped_rows]
    assert stopped[3][0]["finish_reason"] == "stop"
    assert stopped[3][0]["message"]["content"] == alone[3]["choices"][0]["message"]["content"][:3]


def test_batched_generation_pads_prompts_of_different_lengths(model):
    chat_model = model.unwrap_python_model()
    options = {"max_tokens": 8, "sampling": False, "temperature": 1.0, "top_p": 1.0, "stop": [],
               "seed": None}  # fmt: skip
    prompts = [[7, 206, 288, 413, 6, 206, 4, 206], [7, 206, 4, 206], list(range(10, 40))]
    batched = chat_model._generate([(ids, options) for ids in prompts])
    assert batched == [chat_model._generate([(ids, options)])[0] for ids in prompts]
    assert [produced for _, produced, _ in batched] == [8, 8, 8]


def test_a_batch_too_long_to_pad_together_is_still_answered(model):
    chat_model = model.unwrap_python_model()
    context = chat_model._context_length
    # A prompt that fits with 4 new tokens but not with CAP: padded to it, the short row's CAP
    # tokens would pass the context length.
    numbers = next(
        " ".join(map(str, range(count)))
        for count in range(context, 0, -1)
        if len(chat_model._tokenizer.encode(" ".join(map(str, range(count))))) <= context - 4
    )
    long_prompt = {"prompt": numbers, "max_tokens": 4}
    assert len(chat_model._encode(long_prompt["prompt"], 4)) + CAP > context
    short_prompt = {"prompt": "Hello there", "max_tokens": CAP}
    alone = [model.predict(row)[0] for row in (long_prompt, short_prompt)]
    assert model.predict([long_prompt, short_prompt]) == alone


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"messages": []}, "'messages' must not be empty"),
        (
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "messages[0].role must be one of system, user, assistant; got 'wizard'",
        ),
        (_chat("hi", max_tokens=0), "'max_tokens' must be an integer in [1, 64]; got 0"),
        (_chat("hi", max_tokens=-5), "'max_tokens' must be an integer in [1, 64]; got -5"),
        (_chat("hi", max_tokens=65), "'max_tokens' must be an integer in [1, 64]; got 65"),
        ({"prompt": ""}, "'prompt' must be a non-empty string"),
        (
            _chat("hi", temperature=1.0, seed=-1),
            "'seed' must be an integer in [0, 2147483647]; got -1",
        ),
        ({"nothing": "here"}, "Each row needs 'messages' (a chat) or 'prompt' (text)"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(model, request_body, message):
    with pytest.raises(MlflowException) as raised:
        model.predict(request_body)
    assert message in raised.value.message


def test_non_string_content_is_refused(model):
    from llm_packager.serving.requests import BadRequestError, chat_messages

    with pytest.raises(BadRequestError, match=r"messages\[0\]\.content must be a string; got int"):
        chat_messages([{"role": "user", "content": 42}])
    with pytest.raises(MlflowException):
        model.predict({"messages": [{"role": "user", "content": 42}]})


def test_prompt_longer_than_the_context_is_refused(model):
    long_text = "word " * 600
    with pytest.raises(MlflowException) as raised:
        model.predict(_chat(long_text, max_tokens=10))
    assert "plus max_tokens (10) exceeds the model's context length of 512 tokens" in (
        raised.value.message
    )


def test_prebuilt_source_offline_names_the_fix(local_tracking, tiny_model_dir):
    from llm_packager.config.compose import compose_config
    from llm_packager.sources.hub import HubUnreachableError

    onnx = compose_config("phi3-mini-4k-instruct", "").onnx
    with mlflow.start_run() as fetch_run:
        fetch_model(local_fetch_parameters(tiny_model_dir), fetch_run.info.run_id)
    request = LogOnnxParameters(
        fetch_model_run_id=fetch_run.info.run_id, source=OnnxSource.prebuilt,
        repo_id=onnx.repo_id, revision=onnx.revision, subfolder=onnx.subfolder,
        allow_patterns=tuple(onnx.allow_patterns),
    )  # fmt: skip
    with (
        mlflow.start_run() as run,
        pytest.raises(HubUnreachableError, match="model=tiny-random-phi3"),
    ):
        log_onnx(request, run.info.run_id)


def test_a_published_build_for_another_model_is_refused(tiny_model_dir, fp32_onnx, tmp_path):
    from llm_packager.models.onnx_build import PrebuiltMismatchError, check_prebuilt_matches

    check_prebuilt_matches(fp32_onnx, tiny_model_dir)
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    config = json.loads((other / "config.json").read_text())
    config |= {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        PrebuiltMismatchError,
        match=r"is for another model: model type phi3 \(ONNX\) vs llama \(fetched\); vocab_size "
        r"1024 \(ONNX\) vs 49152 \(fetched\); hidden_size 64 \(ONNX\) vs 576 \(fetched\)\. Build "
        r"one from the fetched weights with onnx=build$",
    ):
        check_prebuilt_matches(fp32_onnx, other)


# Streaming and the shared decode loop. The tiny model's context is 512 tokens; a loaded copy with
# a higher cap lets one answer run long enough for others to arrive while it is generated.
LONG_TOKENS = 400


def _load_with(logged_fp32, **config):
    uri, _, result = logged_fp32
    with tracking_uri(uri):
        loaded = mlflow.pyfunc.load_model(result.model_uri, model_config=config)
    return loaded.unwrap_python_model()


@pytest.fixture(scope="module")
def long_model(logged_fp32):
    # Requests start as soon as they arrive: these tests are about joining a running loop. Rows
    # for one request of eight choices and the requests that join it.
    return _load_with(logged_fp32, max_tokens_cap=LONG_TOKENS, batch_wait_ms=0, max_batch_size=12)


def _streamed(chunks) -> tuple[dict[int, str], dict[int, str], list[dict]]:
    """Each choice's concatenated content and finish reason, and the chunks themselves."""
    chunks = list(chunks)
    contents: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        (choice,) = chunk["choices"]
        contents[choice["index"]] = contents.get(choice["index"], "") + choice["delta"].get(
            "content", ""
        )
        if choice["finish_reason"] is not None:
            reasons[choice["index"]] = choice["finish_reason"]
    return contents, reasons, chunks


def test_held_back_text_is_the_longest_ending_that_could_become_a_stop_string():
    from llm_packager.serving.requests import held_back

    assert held_back("Hello wor", ["world"]) == 3
    assert held_back("Hello w", ["world", "x"]) == 1
    assert held_back("Hello", ["world"]) == 0
    assert held_back("ab", ["abc", "bcd"]) == 2
    assert held_back("anything", []) == 0


def test_a_stream_adds_up_to_the_answer_and_ends_with_usage(model):
    request = _chat("Tell me a joke about atom", max_tokens=20, n=2)
    answer = model.predict(request)[0]
    contents, reasons, chunks = _streamed(model.predict_stream(request))
    assert contents == {c["index"]: c["message"]["content"] for c in answer["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in answer["choices"]}
    # Each choice opens with its role, and only the last chunk carries the usage.
    assert [chunk["choices"][0]["delta"] for chunk in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    assert chunks[-1]["usage"] == answer["usage"]
    assert all("usage" not in chunk for chunk in chunks[:-1])
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_a_stream_never_shows_any_part_of_a_stop_string(model):
    text = model.predict(_chat("Tell me a joke about atom", max_tokens=20))[0]["choices"][0][
        "message"
    ]["content"]
    # A stop string that starts inside the answer and goes on past it: each of its prefixes
    # appears in the text and must be held back, then let go when the answer ends.
    for stop in (text[4:7], text[-2:] + "\u2603"):
        request = _chat("Tell me a joke about atom", max_tokens=20, stop=[stop])
        expected = model.predict(request)[0]["choices"][0]
        contents, reasons, chunks = _streamed(model.predict_stream(request))
        assert contents[0] == expected["message"]["content"]
        assert reasons[0] == expected["finish_reason"]
        shown = ""
        for chunk in chunks:
            shown += chunk["choices"][0]["delta"].get("content", "")
            assert stop not in shown
    assert reasons[0] == "length" and contents[0] == text


def test_a_bad_stream_request_is_refused_before_anything_is_generated(model):
    chat_model = model.unwrap_python_model()
    with pytest.raises(MlflowException, match="'max_tokens' must be an integer"):
        chat_model.predict_stream(None, _chat("hi", max_tokens=-5))
    with pytest.raises(MlflowException, match="one chat request"):
        chat_model.predict_stream(None, {"prompt": "hi"})


def test_a_request_that_arrives_mid_answer_joins_and_leaves_before_it(long_model):
    # Eight choices of one long answer: a batch slow enough for others to come and go meanwhile.
    long_request = _chat("Hi", max_tokens=LONG_TOKENS, n=8)
    short_requests = [_chat("What is 2 + 2?", max_tokens=6), _chat("Name a colour.", max_tokens=3)]
    solo_long = long_model.predict(None, long_request)[0]
    assert solo_long["choices"][0]["finish_reason"] == "length"  # it really runs that long
    solo_short = [long_model.predict(None, request)[0]["choices"] for request in short_requests]

    streaming, long_done_at = threading.Event(), []

    def read_long() -> dict[int, str]:
        chunks = []
        for chunk in long_model.predict_stream(None, long_request):
            chunks.append(chunk)
            if chunk["choices"][0]["delta"].get("content"):
                streaming.set()
        long_done_at.append(time.monotonic())
        return _streamed(chunks)[0]

    with ThreadPoolExecutor(max_workers=1) as pool:
        long_answer = pool.submit(read_long)
        assert streaming.wait(timeout=60)
        together = [long_model.predict(None, request)[0]["choices"] for request in short_requests]
        short_done_at = time.monotonic()
        assert long_answer.result(timeout=120) == {
            choice["index"]: choice["message"]["content"] for choice in solo_long["choices"]
        }
    assert together == solo_short
    assert short_done_at < long_done_at[0]


def test_a_bad_request_fails_alone_while_others_are_answered(long_model):
    good = [_chat(text, max_tokens=8) for text in ("What is 2 + 2?", "Name a colour.", "Hi")]
    bad = [_chat("hi", max_tokens=LONG_TOKENS + 1), {"messages": []},
           _chat("hi", temperature=1e-320)]  # fmt: skip
    solo = [long_model.predict(None, request)[0]["choices"] for request in good]

    def send(request):
        try:
            return long_model.predict(None, request)[0]["choices"]
        except MlflowException as error:
            return error

    mixed = [request for pair in zip(good, bad, strict=True) for request in pair]
    with ThreadPoolExecutor(max_workers=len(mixed)) as pool:
        answers = list(pool.map(send, mixed))
    assert answers[0::2] == solo
    assert all(isinstance(answer, MlflowException) for answer in answers[1::2])
    assert {answer.get_http_status_code() for answer in answers[1::2]} == {400}


def test_a_full_queue_answers_503_and_a_freed_place_is_used(logged_fp32):
    busy_model = _load_with(
        logged_fp32, max_tokens_cap=LONG_TOKENS, max_batch_size=1, max_queued_requests=1
    )
    long_request = _chat("Hi", max_tokens=LONG_TOKENS)
    waiting_request = _chat("What is 2 + 2?", max_tokens=6)
    solo = busy_model.predict(None, waiting_request)[0]["choices"][0]["message"]["content"]
    # With one row, one long answer fills the batch.
    running = []
    for _ in range(1):
        stream = busy_model.predict_stream(None, long_request)
        next(stream), next(stream)  # the role, then generated text: it is in the loop
        running.append(stream)
    waiting = busy_model.predict_stream(None, waiting_request)  # queued, not yet admitted
    with pytest.raises(MlflowException, match="busy: 1 requests are already waiting") as refused:
        busy_model.predict(None, waiting_request)
    assert refused.value.get_http_status_code() == 503
    for stream in running:
        stream.close()  # a client that leaves gives its place back
    contents, _, _ = _streamed(waiting)
    assert contents == {0: solo}


def test_concurrent_requests_are_gathered_into_one_batch_and_a_lone_one_never_waits(
    logged_fp32, model
):
    # onnxruntime-genai's Generators (a batch cannot grow, so arrivals are gathered). A gathering
    # time far longer than the test, so any wait for it would show.
    gathering = _load_with(
        logged_fp32, max_tokens_cap=LONG_TOKENS, max_batch_size=2, batch_wait_ms=600_000,
        batching="generators",
    )  # fmt: skip
    requests = [_chat("What is 2 + 2?", max_tokens=6), _chat("Name a colour.", max_tokens=4)]
    alone = [model.predict(request)[0]["choices"][0]["message"]["content"] for request in requests]
    with ThreadPoolExecutor(max_workers=1) as pool:
        # A lone client's request starts at once.
        lone = pool.submit(lambda: gathering.predict(None, requests[0])[0]["choices"][0])
        assert lone.result(timeout=60)["message"]["content"] == alone[0]
        # While a long answer runs, a second request waits for company...
        running = gathering.predict_stream(None, _chat("Hi", max_tokens=LONG_TOKENS))
        next(running), next(running)
        first = gathering.predict_stream(None, requests[0])
        time.sleep(0.3)
        assert len(gathering._loop._waiting) == 1
        # ...and starts, as one batch with the next, once they fill a batch.
        second = gathering.predict_stream(None, requests[1])
        first_answer = pool.submit(lambda: _streamed(first)[0][0])
        assert [first_answer.result(timeout=60), _streamed(second)[0][0]] == alone
        running.close()


def test_a_request_that_arrives_mid_answer_is_decoded_in_the_same_batch(long_model):
    long_request = _chat("Hi", max_tokens=LONG_TOKENS, n=2)
    # Long enough to be still generating when the test looks at the batch.
    short_request = _chat("What is 2 + 2?", max_tokens=LONG_TOKENS // 2)
    solo = long_model.predict(None, short_request)[0]["choices"][0]
    assert solo["finish_reason"] == "length"
    running = long_model.predict_stream(None, long_request)
    next(running), next(running), next(running)  # both roles, then text: the long one runs
    short = long_model.predict_stream(None, short_request)
    started = [next(short), next(short)]  # its role, then its first text
    # One batch: the second answer's row sits beside the first answer's two.
    assert len(long_model._loop._rows.sequences) == 3
    assert _streamed([*started, *short])[0] == {0: solo["message"]["content"]}
    running.close()


def test_our_decoder_answers_exactly_as_onnxruntime_genai_generators_do(logged_fp32, model):
    generators = _load_with(logged_fp32, batching="generators")
    assert generators._loop._rows is None and model.unwrap_python_model()._loop._rows is not None
    rows = [
        _chat("What is the capital of Spain?", max_tokens=12, n=1),
        _chat("Hi", max_tokens=5, n=1),
        _chat("Write a long, detailed poem about the sea and its many moods.", max_tokens=16, n=1),
    ]
    ours, theirs = model.predict(rows), generators.predict(None, rows)
    assert [(answer["choices"], answer["usage"]) for answer in ours] == [
        (answer["choices"], answer["usage"]) for answer in theirs
    ]


def test_builds_the_shared_rows_cannot_decode_are_left_to_generators(model, fp32_onnx, monkeypatch):
    chat_model = model.unwrap_python_model()
    shared_rows, tokenizer = type(chat_model._loop._rows), chat_model._tokenizer
    config = json.loads((fp32_onnx / "genai_config.json").read_text())
    assert shared_rows.open(fp32_onnx, config, tokenizer, 1) is not None
    cuda = json.loads(json.dumps(config))
    cuda["model"]["decoder"]["session_options"]["provider_options"] = [{"cuda": {}}]
    assert shared_rows.open(fp32_onnx, cuda, tokenizer, 1) is None
    # A cache named differently from the graph's inputs (here: one layer fewer).
    other = json.loads(json.dumps(config))
    other["model"]["decoder"]["num_hidden_layers"] -= 1
    assert shared_rows.open(fp32_onnx, other, tokenizer, 1) is None

    def cannot_share(self):
        raise ValueError("present is longer than past")

    monkeypatch.setattr(shared_rows, "_probe", cannot_share)
    assert shared_rows.open(fp32_onnx, config, tokenizer, 1) is None


def test_a_longer_request_joining_grows_the_cache_without_changing_the_running_answer(long_model):
    # The first answer's cache holds 256 tokens; the second needs more, so the rows are copied
    # into a longer cache while the first is being generated.
    first_request = _chat("Hi", max_tokens=120)
    longer_request = _chat("Hi", max_tokens=LONG_TOKENS)
    solo = [long_model.predict(None, request)[0]["choices"][0] for request in
            (first_request, longer_request)]  # fmt: skip
    assert [answer["finish_reason"] for answer in solo] == ["length", "length"]
    first = long_model.predict_stream(None, first_request)
    started = [next(first), next(first)]  # its role, then its first text: it is generating
    rows = long_model._loop._rows
    length_before = rows._cache[0].shape[2]
    second = long_model.predict_stream(None, longer_request)
    second_started = [next(second), next(second)]
    assert rows._cache[0].shape[2] > length_before
    assert len(rows.sequences) == 2  # grown while the first was held, not after it ended
    assert _streamed([*started, *first])[0] == {0: solo[0]["message"]["content"]}
    assert _streamed([*second_started, *second])[0] == {0: solo[1]["message"]["content"]}

"""One answer whichever decoder: the shared rows apply the build's generation settings as
onnxruntime-genai does (here a repetition penalty), leave to onnxruntime-genai the builds whose
settings they lack, recognise bfloat16 caches, and check a step's logits at load."""

from __future__ import annotations

import json

import pytest

from llm_packager.serving.shared_rows import SharedRows, unsupported_search
from tests.serving.serving_support import chat, genai_config_of, load, streamed_text

PROMPTS = [
    chat("What is the capital of Spain?", max_tokens=40),
    chat("Hi", max_tokens=30),
    chat("Write a long, detailed poem about the sea and its many moods.", max_tokens=48),
]


def _answers(model, requests) -> list[tuple]:
    return [(answer["choices"], answer["usage"])
            for answer in (model.predict(None, request)[0] for request in requests)]  # fmt: skip


def test_with_a_repetition_penalty_both_decoders_answer_alike(penalised_fp32, served_fp32):
    rows = load(penalised_fp32, batch_wait_ms=0)
    generators = load(penalised_fp32, batching="generators")
    assert rows._loop._rows is not None and generators._loop._rows is None
    ours = _answers(rows, PROMPTS)
    assert ours == _answers(generators, PROMPTS)
    # Together in one batch of rows, still each answer it gets alone.
    assert [(a["choices"], a["usage"]) for a in rows.predict(None, PROMPTS)] == ours
    # The penalty changes these answers, so the comparison above is not one of plain greedy.
    assert ours != _answers(load(served_fp32, batch_wait_ms=0), PROMPTS)


@pytest.mark.parametrize(
    ("setting", "value"), [("no_repeat_ngram_size", 3), ("num_beams", 2), ("min_length", 5)]
)
def test_builds_with_settings_the_rows_lack_are_decoded_by_generators(
    served_fp32, tmp_path, setting, value
):
    config = json.loads(genai_config_of(served_fp32).read_text())
    assert unsupported_search(config["search"]) is None
    config["search"][setting] = value
    assert setting in unsupported_search(config["search"])
    model = load(served_fp32)
    folder = genai_config_of(served_fp32).parent
    assert SharedRows.open(folder, config, model._loop._tokenizer, 1) is None


def test_a_bfloat16_cache_is_left_to_generators_not_read_as_float16(served_fp32, monkeypatch):
    model = load(served_fp32)
    folder = genai_config_of(served_fp32).parent
    config = json.loads(genai_config_of(served_fp32).read_text())
    import onnxruntime

    real = onnxruntime.InferenceSession

    class Bfloat16Inputs(real):
        def get_inputs(self):
            class Node:
                def __init__(self, node):
                    self.name = node.name
                    self.type = "tensor(bfloat16)" if node.name.startswith("past_") else node.type

            return [Node(node) for node in super().get_inputs()]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Bfloat16Inputs)
    assert SharedRows.open(folder, config, model._loop._tokenizer, 1) is None
    monkeypatch.setattr(onnxruntime, "InferenceSession", real)
    assert SharedRows.open(folder, config, model._loop._tokenizer, 1) is not None


def test_the_load_probe_compares_logits_not_only_shapes(served_fp32, monkeypatch):
    """A cache the graph does not read as bound gives logits of the right shape but other
    values; the probe refuses it (here: a step that reads an empty past)."""
    model = load(served_fp32)
    folder = genai_config_of(served_fp32).parent
    config = json.loads(genai_config_of(served_fp32).read_text())
    run, calls = SharedRows._run, []

    def forgetting_run(self, cache, ids, mask):
        calls.append(ids.shape)
        if len(calls) == 2:  # the probe's step: its past read as zeros
            for array in cache:
                array[:] = 0
        return run(self, cache, ids, mask)

    monkeypatch.setattr(SharedRows, "_run", forgetting_run)
    assert SharedRows.open(folder, config, model._loop._tokenizer, 1) is None
    monkeypatch.setattr(SharedRows, "_run", run)
    assert SharedRows.open(folder, config, model._loop._tokenizer, 1) is not None


def test_a_long_prompt_read_in_chunks_between_steps_gives_the_same_answers(served_fp32):
    """A prompt longer than the chunk is read a chunk per step beside a running answer; both
    answers equal those they get alone with the prompt read whole."""
    model = load(served_fp32, batch_wait_ms=0)
    rows = model._loop._rows
    long_request = chat(" ".join(["the sea and its many moods"] * 12), max_tokens=20)
    running_request = chat("Hi", max_tokens=120)
    alone = [model.predict(None, r)[0]["choices"] for r in (long_request, running_request)]
    assert len(model._prepare(long_request, {}, chat=True)[0]) > 64
    rows.prompt_chunk_tokens = 16
    reads, read_chunk = [], rows._read_chunk

    def counting_read(end_tokens):
        if rows._reading:
            reads.append(len(rows.sequences))  # rows decoding while a chunk is read
        read_chunk(end_tokens)

    rows._read_chunk = counting_read
    running = model.predict_stream(None, running_request)
    started = [next(running), next(running)]
    long_answer = model.predict(None, long_request)[0]["choices"]
    assert long_answer == alone[0]
    assert streamed_text([*started, *running])[0] == alone[1][0]["message"]["content"]
    assert len(reads) > 3 and all(count == 1 for count in reads)  # chunks, between steps


def test_more_sequences_than_a_generator_holds_decode_in_several_each_as_alone(served_fp32):
    """onnxruntime-genai refuses a Generator of more than 32 rows; a max_batch_size above that
    starts more Generators instead of failing every request of the batch."""
    model = load(served_fp32, batching="generators", max_batch_size=40)
    requests = [chat(f"Say the number {number}.", max_tokens=3) for number in range(40)]
    together = model.predict(None, requests)
    assert [(a["choices"], a["usage"]) for a in together] == _answers(model, requests)

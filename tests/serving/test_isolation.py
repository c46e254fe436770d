"""One failing row among running ones ends alone: faults injected where they happen (the sampler,
the tokenizer's stream, an onnxruntime run), in both decoders where the fault can be one row's.
Every other row keeps decoding, and its answer equals the one it gets alone."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from tests.serving.serving_support import LONG_TOKENS, chat, load, streamed_text

GOOD = [chat("What is 2 + 2?", max_tokens=60), chat("Name a colour.", max_tokens=80),
        chat("Write a poem about the sea.", max_tokens=100)]  # fmt: skip
VICTIM = chat("Tell me a joke about atom", max_tokens=LONG_TOKENS)
FAILED = "Generating this answer failed and it was stopped; the model's other answers go on."


@pytest.fixture(scope="module")
def rows_model(served_fp32):
    model = load(served_fp32, batch_wait_ms=0, max_batch_size=8)
    assert model._loop._rows is not None
    return model


@pytest.fixture(scope="module")
def solo(rows_model) -> list[str]:
    return [rows_model.predict(None, request)[0]["choices"][0]["message"]["content"]
            for request in GOOD]  # fmt: skip


def _victim_ids(model) -> list[int]:
    ids, _ = model._prepare(VICTIM, {}, chat=True)
    return ids


def _run_beside_the_victim(model, victim=VICTIM) -> tuple[list[str], BaseException | None]:
    """Start the good streams, let each produce text (so they are decoding), then send the
    victim; read everything. Returns the good answers and what the victim's request raised."""
    streams = [model.predict_stream(None, request) for request in GOOD]
    started = []
    for stream in streams:
        chunks = [next(stream)]
        while not chunks[-1]["choices"][0]["delta"].get("content"):
            chunks.append(next(stream))
        started.append(chunks)
    with ThreadPoolExecutor(max_workers=1) as pool:
        victim_answer = pool.submit(model.predict, None, victim)
        answers = [streamed_text([*chunks, *stream])[0]
                   for chunks, stream in zip(started, streams, strict=True)]  # fmt: skip
        try:
            victim_answer.result(timeout=120)
            raised = None
        except MlflowException as error:
            raised = error
    return answers, raised


def _assert_alone(model, solo, answers, raised) -> None:
    assert answers == solo
    assert raised is not None and FAILED in raised.message
    assert raised.get_http_status_code() == 500
    # Nothing is left held, and the model answers as before.
    assert model._loop._rows.sequences == []
    assert model.predict(None, GOOD[0])[0]["choices"][0]["message"]["content"] == solo[0]


@pytest.mark.parametrize("at_call", [1, 5], ids=["first-token", "mid-answer"])
def test_a_sampler_failure_ends_its_row_alone(rows_model, solo, monkeypatch, at_call):
    rows, victim_ids, calls = rows_model._loop._rows, _victim_ids(rows_model), [0]
    choose = rows._choose

    def failing_choose(logits, sequence):
        if sequence.ids == victim_ids:
            calls[0] += 1
            if calls[0] == at_call:
                raise FloatingPointError("probabilities contain NaN")
        return choose(logits, sequence)

    monkeypatch.setattr(rows, "_choose", failing_choose)
    _assert_alone(rows_model, solo, *_run_beside_the_victim(rows_model))
    assert calls[0] == at_call  # the victim's row was dropped the step it failed


class _FailingStreams:
    """The model's tokenizer, where the ``fail``-th stream created once armed fails at its third
    token (the decoders create a stream per sequence, in row order, as it starts)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self.fail, self._created = tokenizer, None, 0

    def create_stream(self):
        stream = self._tokenizer.create_stream()
        if self.fail is None:
            return stream
        self._created += 1
        if self._created != self.fail:
            return stream
        decoded = [0]

        class Failing:
            def decode(self, token):
                decoded[0] += 1
                if decoded[0] == 3:
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
                return stream.decode(token)

        return Failing()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_a_tokenizer_failure_ends_its_row_alone(rows_model, solo, monkeypatch):
    rows = rows_model._loop._rows
    failing = _FailingStreams(rows._tokenizer)
    monkeypatch.setattr(rows, "_tokenizer", failing)
    streams = [rows_model.predict_stream(None, request) for request in GOOD]
    started = [[next(stream), next(stream)] for stream in streams]  # the good rows are decoding
    failing.fail = 1  # the victim's, the next stream created
    with pytest.raises(MlflowException, match=FAILED) as raised:
        rows_model.predict(None, VICTIM)
    assert "UnicodeDecodeError" in raised.value.message
    assert [streamed_text([*chunks, *stream])[0]
            for chunks, stream in zip(started, streams, strict=True)] == solo  # fmt: skip


class _SessionFailingOnARow:
    """The onnxruntime session, whose runs fail whenever the bound cache includes one row (the
    row the test names), as a run whose input for one row is broken fails. Binding is recorded
    through ``io_binding`` to see which rows a run covers; everything else is the session."""

    def __init__(self, session, rows, victim_ids: list[int]) -> None:
        self._session, self._rows, self._victim_ids = session, rows, victim_ids
        self.failed_runs = 0

    def io_binding(self):
        return _RecordingBinding(self._session.io_binding())

    def run_with_iobinding(self, binding, *args):
        first = binding.first_past
        rows = self._rows
        victim = next((row for row, sequence in enumerate(rows.sequences)
                       if sequence.ids == self._victim_ids), None)  # fmt: skip
        if victim is not None and first is not None:
            start, count = first.data_ptr(), first.shape()[0]
            address = rows._cache[0][victim].ctypes.data
            row_bytes = rows._cache[0][0].nbytes
            if start <= address < start + count * row_bytes:
                self.failed_runs += 1
                raise RuntimeError("onnxruntime: Non-zero status code returned while running")
        return self._session.run_with_iobinding(binding.binding, *args)

    def __getattr__(self, name):
        return getattr(self._session, name)


class _RecordingBinding:
    def __init__(self, binding) -> None:
        self.binding, self.first_past = binding, None

    def bind_ortvalue_input(self, name, value):
        if name == "past_key_values.0.key":
            self.first_past = value
        self.binding.bind_ortvalue_input(name, value)

    def __getattr__(self, name):
        return getattr(self.binding, name)


def test_an_onnxruntime_run_failing_on_one_row_ends_that_row_alone(rows_model, solo, monkeypatch):
    rows = rows_model._loop._rows
    session = _SessionFailingOnARow(rows._session, rows, _victim_ids(rows_model))
    monkeypatch.setattr(rows, "_session", session)
    monkeypatch.setattr(rows, "_step_binding", None)  # bindings made from now on are recorded
    _assert_alone(rows_model, solo, *_run_beside_the_victim(rows_model))
    # The step with every row failed, then the victim's run of its own.
    assert session.failed_runs == 2


def test_a_step_that_fails_once_for_every_row_loses_no_answer(rows_model, solo, monkeypatch):
    """A batch-wide run error (not one row's): each row is run again alone, and every answer
    is still its solo answer."""
    rows, failures, armed = rows_model._loop._rows, [], [False]
    session = rows._session

    class FailingOnce:
        def run_with_iobinding(self, binding, *args):
            if armed[0] and not failures:
                failures.append(len(rows.sequences))
                raise RuntimeError("onnxruntime: bad allocation")
            return session.run_with_iobinding(binding, *args)

        def __getattr__(self, name):
            return getattr(session, name)

    monkeypatch.setattr(rows, "_session", FailingOnce())
    streams = [rows_model.predict_stream(None, request) for request in GOOD]
    started = [[next(stream), next(stream)] for stream in streams]  # all three are decoding
    armed[0] = True  # the next run, a step of the rows still decoding, fails
    answers = [streamed_text([*chunks, *stream])[0]
               for chunks, stream in zip(started, streams, strict=True)]  # fmt: skip
    assert len(failures) == 1 and failures[0] >= 2  # (a short answer may have ended already)
    assert answers == solo


def test_the_row_state_stays_in_step_when_a_row_fails(rows_model, monkeypatch):
    """The bug behind issue 25: a failure between two of the per-row lists' updates left them
    out of step, and the next step's reshape failed every row."""
    rows, victim_ids = rows_model._loop._rows, _victim_ids(rows_model)
    choose, seen_sizes = rows._choose, []

    def checking_choose(logits, sequence):
        seen_sizes.append({len(rows.sequences), len(rows._lengths), len(rows._last)})
        if sequence.ids == victim_ids:
            raise ValueError("probabilities do not sum to 1")
        return choose(logits, sequence)

    monkeypatch.setattr(rows, "_choose", checking_choose)
    _, raised = _run_beside_the_victim(rows_model)
    assert raised is not None
    assert all(len(sizes) == 1 for sizes in seen_sizes)


def test_generators_end_a_row_whose_text_fails_alone(served_fp32, monkeypatch):
    """onnxruntime-genai's Generators: a row whose text cannot be shown ends alone while the
    other row of its batch goes on (the sampler and the runs are onnxruntime-genai's, one
    call for the whole batch, so a fault there is the batch's)."""
    model = load(served_fp32, batching="generators", max_batch_size=2, batch_wait_ms=600_000)
    requests = [GOOD[0], chat("Tell me a joke about atom", max_tokens=60)]
    alone = model.predict(None, requests[0])[0]["choices"][0]["message"]["content"]
    failing = _FailingStreams(model._loop._tokenizer)
    monkeypatch.setattr(model._loop, "_tokenizer", failing)
    running = model.predict_stream(None, chat("Hi", max_tokens=LONG_TOKENS))
    next(running), next(running)  # a long answer runs: the next two arrivals are gathered
    good = model.predict_stream(None, requests[0])
    failing.fail = 2  # one batch of two: the good row's stream, then the victim's
    victim = model.predict_stream(None, requests[1])
    with ThreadPoolExecutor(max_workers=1) as pool:
        good_text = pool.submit(lambda: streamed_text(good)[0])
        with pytest.raises(MlflowException, match=FAILED):
            list(victim)
        assert good_text.result(timeout=120) == alone
    running.close()


def test_a_dropped_stream_gives_its_rows_back(rows_model):
    loop = rows_model._loop
    stream = rows_model.predict_stream(None, chat("Hi", max_tokens=LONG_TOKENS, n=2))
    assert loop._in_flight == 1
    del stream  # never read: its sequences were queued, and are released with it
    assert loop._in_flight == 0
    stream = rows_model.predict_stream(None, chat("Hi", max_tokens=LONG_TOKENS))
    next(stream), next(stream)  # decoding now
    assert len(loop._rows.sequences) == 1
    stream.close()
    # Given back at the end of the step under way (a step takes a few milliseconds here).
    for _ in range(200):
        if not loop._rows.sequences:
            break
        time.sleep(0.005)
    assert loop._rows.sequences == []


def test_a_request_with_more_sequences_than_rows_is_admitted_in_parts(served_fp32, monkeypatch):
    model = load(served_fp32, batch_wait_ms=0, max_batch_size=2)
    rows = model._loop._rows
    requests = [chat(text, max_tokens=12, n=2) for text in ("Hi", "Why?", "Count to ten.")]
    alone = [model.predict(None, request)[0]["choices"] for request in requests]
    step, most = rows.step, [0]

    def counting_step(end_tokens):
        most[0] = max(most[0], len(rows.sequences), rows._cache[0].shape[0])
        step(end_tokens)

    monkeypatch.setattr(rows, "step", counting_step)
    together = model.predict(None, requests)  # 3 rows x n=2: six sequences, two rows
    assert [answer["choices"] for answer in together] == alone
    assert most[0] == 2


def test_a_seeded_row_samples_the_same_wherever_it_sits_in_its_request(rows_model):
    sampled = chat("Define entropy in one line.", max_tokens=12, temperature=1.0, seed=7)
    alone = rows_model.predict(None, sampled)[0]["choices"]
    behind = rows_model.predict(None, [chat("Hi", max_tokens=12, temperature=1.0, seed=3),
                                       sampled])[1]["choices"]  # fmt: skip
    assert behind == alone


def test_the_cache_never_holds_more_rows_than_configured(served_fp32):
    model = load(served_fp32, batch_wait_ms=0, max_batch_size=3)
    rows = model._loop._rows
    rows._reserve(2, 10)
    rows._reserve(3, 10)  # doubling would make four
    assert rows._cache[0].shape[0] == 3
    with pytest.raises(ValueError, match="at most 3"):
        rows._reserve(4, 10)
    rows._replace_cache([])
    assert np.dtype(rows._cache_dtype) == np.float32

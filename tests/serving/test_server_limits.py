"""Bounds and back-pressure through a real `mlflow models serve`: the queue limit answers 503
(not the server's 504), a timed-out request gives its rows back, a request with more sequences
than rows is answered, and out-of-range options are 400s. One server start.

The server's model is slowed (10 ms more per onnxruntime run, by a ``sitecustomize`` module on
the server's PYTHONPATH) so that an answer outlasts the server's request timeout; nothing else
in it is changed."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.common import local_server
from tests.serving.serving_support import LONG_TOKENS, chat
from tests.support import project_environment

pytestmark = pytest.mark.slow

# More rows plus queue than the scoring server's default pool ever has (min(32, cores + 4)), so
# that without the model's larger pool no request could ever be answered 503.
MAX_BATCH_SIZE, MAX_QUEUED_REQUESTS = 4, 30
CLIENTS = MAX_BATCH_SIZE + MAX_QUEUED_REQUESTS + 6
TIMEOUT_SECONDS = 4
SLOW_SECONDS = 0.01  # per run: 400 tokens take over 4 s
_SLOW_MODEL = f"""
import time
import onnxruntime

_run = onnxruntime.InferenceSession.run_with_iobinding


def _slow_run(self, *args, **kwargs):
    time.sleep({SLOW_SECONDS})
    return _run(self, *args, **kwargs)


onnxruntime.InferenceSession.run_with_iobinding = _slow_run
"""


@pytest.fixture(scope="module")
def server(served_fp32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-limits")
    (folder / "slow").mkdir()
    (folder / "slow" / "sitecustomize.py").write_text(_SLOW_MODEL)
    config = {"max_batch_size": MAX_BATCH_SIZE, "max_queued_requests": MAX_QUEUED_REQUESTS,
              "batch_wait_ms": 0}  # fmt: skip

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(served_fp32),
                "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--timeout", str(TIMEOUT_SECONDS)]  # fmt: skip

    environment = project_environment(
        SERVING_MODEL_CONFIG=json.dumps(config), PYTHONPATH=str(folder / "slow")
    )
    with local_server(command, "/ping", environment=environment, start_seconds=120,
                      log=folder / "serve.log", cwd=folder) as base:  # fmt: skip
        yield base


def _post(base: str, body: dict, timeout: float = 60) -> tuple[int, object, float]:
    """Status, answer and seconds taken."""
    started = time.monotonic()
    request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
            return response.status, answer, time.monotonic() - started
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {"message": text}
        return error.code, answer, time.monotonic() - started


@pytest.mark.parametrize("body", ['{"temperature": 1e-320', '{"temperature": NaN',
                                  '{"top_p": NaN, "temperature": 1.0'])  # fmt: skip
def test_out_of_range_options_are_400_through_the_server(server, body):
    messages = '"messages": [{"role": "user", "content": "Hi"}]}'
    request = urllib.request.Request(f"{server}/invocations",
                                     data=f"{body}, {messages}".encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400
    assert "must be a number in" in json.loads(refused.value.read())["message"]


def test_a_request_with_more_sequences_than_rows_is_answered(server):
    rows = [chat(text, max_tokens=6, n=2) for text in ("Hi", "Why?", "Count to ten.")]
    alone = [_post(server, row)[1][0]["choices"] for row in rows]
    # Six sequences for four rows; several rows go as a DataFrame's records.
    status, answers, _ = _post(server, {"dataframe_records": rows})
    assert status == 200, answers
    # A DataFrame's answers come back under "predictions".
    assert [answer["choices"] for answer in answers["predictions"]] == alone


def test_a_full_queue_answers_503_and_timed_out_requests_give_their_rows_back(server):
    long_request = chat("Hi", max_tokens=LONG_TOKENS)
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        answers = list(pool.map(lambda _: _post(server, long_request), range(CLIENTS)))
    statuses = [status for status, _, _ in answers]
    # Every request past the rows and the queue is refused at once, by the model.
    refused = [(answer, seconds) for status, answer, seconds in answers if status == 503]
    assert len(refused) == CLIENTS - MAX_BATCH_SIZE - MAX_QUEUED_REQUESTS, statuses
    assert all("busy" in answer["message"] and seconds < 2 for answer, seconds in refused)
    # The others outlast the server's timeout (504); they must not go on generating.
    assert statuses.count(504) == MAX_BATCH_SIZE + MAX_QUEUED_REQUESTS, statuses
    status, answer, seconds = _post(server, chat("What is 2 + 2?", max_tokens=4))
    assert status == 200, answer
    # Generating on for the timed-out requests would take over 4 s per row of them.
    assert seconds < 2

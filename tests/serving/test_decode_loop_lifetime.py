"""A loaded model whose last user dropped it is freed: its decode loop's thread does not wait for
ever."""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref

import mlflow

from tests.serving.serving_support import chat


def _loop_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "onnx-decode-loop"]


def test_an_idle_loop_ends_its_thread_and_a_dropped_model_is_freed(served_fp32, monkeypatch):
    model = mlflow.pyfunc.load_model(str(served_fp32))
    python_model = model.unwrap_python_model()
    loop = python_model._loop
    # The model runs its logged copy of the serving code: shorten that copy's idle time.
    monkeypatch.setattr(sys.modules[type(loop).__module__], "IDLE_THREAD_SECONDS", 0.3)
    before = set(_loop_threads())
    first = model.predict(chat("Hi", max_tokens=3))
    for _ in range(50):
        if set(_loop_threads()) <= before:
            break
        time.sleep(0.1)
    assert set(_loop_threads()) <= before, "the idle loop's thread is still waiting"
    # The next request starts a new thread and answers as before.
    assert model.predict(chat("Hi", max_tokens=3))[0]["choices"] == first[0]["choices"]
    time.sleep(1.0)
    dropped, dropped_loop = weakref.ref(python_model), weakref.ref(loop)
    del model, python_model, loop
    # MLflow itself keeps the model a models-from-code file set last
    # (mlflow.models.model.__mlflow_model__) until the next load: load the next one, as a batch
    # job or a Spark task does.
    mlflow.pyfunc.load_model(str(served_fp32))
    gc.collect()
    assert dropped() is None, "the dropped model is still held"
    assert dropped_loop() is None, "the dropped model's decode loop (and its decoders) is held"

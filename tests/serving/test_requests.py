"""Every generation option is checked to a finite, sane range before anything is generated: NaN,
infinities and denormals are refused with HTTP 400 and a message naming the field."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from llm_packager.serving.requests import BadRequestError, number, request_rows
from tests.serving.serving_support import chat

REFUSED = {
    "temperature NaN": ({"temperature": math.nan},
                        "'temperature' must be a number in [0.001, 100]"),
    "temperature inf": ({"temperature": math.inf}, "'temperature'"),
    "temperature -inf": ({"temperature": -math.inf}, "'temperature'"),
    "temperature denormal": ({"temperature": 1e-320}, "got 1e-320"),
    "temperature 1000": ({"temperature": 1000.0}, "'temperature'"),
    "top_p NaN": ({"top_p": math.nan}, "'top_p' must be a number in (0, 1]"),
    "top_p 0": ({"top_p": 0.0}, "'top_p'"),
    "top_p inf": ({"top_p": math.inf}, "'top_p'"),
    "max_tokens NaN": ({"max_tokens": math.nan}, "'max_tokens' must be an integer in [1, 400]"),
    "max_tokens inf": ({"max_tokens": math.inf}, "'max_tokens'"),
    "max_tokens 2.5": ({"max_tokens": 2.5}, "'max_tokens'"),
    "seed inf": ({"temperature": 1.0, "seed": math.inf}, "'seed' must be an integer"),
    "seed 2**40": ({"temperature": 1.0, "seed": 2**40}, "'seed'"),
    "n 2.5": ({"n": 2.5}, "'n' must be an integer in [1, 8]"),
    "n NaN": ({"n": math.nan}, "'n'"),
}  # fmt: skip


@pytest.fixture(scope="module")
def pyfunc_model(served_fp32):
    return mlflow.pyfunc.load_model(str(served_fp32))


@pytest.mark.parametrize("case", list(REFUSED))
def test_out_of_range_options_are_refused_with_400(pyfunc_model, case):
    options, message = REFUSED[case]
    # The model's own check, called directly (as MLflow's predict_stream and a batch job do);
    # its classes are those of the model's logged copy of llm_packager/serving.
    with pytest.raises(MlflowException) as raised:
        pyfunc_model.unwrap_python_model().predict(None, chat("Hi", **options))
    assert message in raised.value.message
    assert type(raised.value).__name__ == "BadRequestError"
    # Through MLflow's pyfunc: its schema check refuses a NaN in an integer field first; either
    # way the answer is a 400.
    with pytest.raises(MlflowException) as raised:
        pyfunc_model.predict(chat("Hi", **options))
    assert raised.value.get_http_status_code() == 400


def test_temperature_zero_asks_for_the_greedy_answer(pyfunc_model):
    # OpenAI's clients send temperature=0 for "greedy"; it is no sampling temperature.
    greedy = pyfunc_model.predict(chat("Hi", max_tokens=6))
    zero = pyfunc_model.predict(chat("Hi", max_tokens=6, temperature=0.0))
    assert zero[0]["choices"][0]["message"] == greedy[0]["choices"][0]["message"]
    # A top_p beside it is still checked, though greedy answers do not use it.
    with pytest.raises(MlflowException, match="'top_p'"):
        pyfunc_model.unwrap_python_model().predict(None, chat("Hi", temperature=0.0, top_p=0.0))


def test_the_edges_of_each_range_are_accepted(pyfunc_model):
    answer = pyfunc_model.predict(chat("Hi", max_tokens=2, temperature=1e-3, top_p=1.0, seed=0))
    assert answer[0]["usage"]["completion_tokens"] >= 1
    answer = pyfunc_model.predict(chat("Hi", max_tokens=2, temperature=100.0, top_p=1e-9))
    assert answer[0]["usage"]["completion_tokens"] >= 1


def test_a_field_left_out_of_some_rows_is_absent_but_a_nan_sent_is_refused():
    frame = pd.DataFrame([{"prompt": "a", "temperature": 0.5}, {"prompt": "b"}])
    assert request_rows(frame) == [{"prompt": "a", "temperature": 0.5}, {"prompt": "b"}]
    # pandas makes no column that no row names: a column of NaN only was sent as NaN.
    sent = request_rows(pd.DataFrame([{"prompt": "a", "temperature": math.nan}]))
    assert math.isnan(sent[0]["temperature"])


@pytest.mark.parametrize("value", [True, "1", None, [1]])
def test_a_number_must_be_a_number(value):
    with pytest.raises(BadRequestError, match=r"'x' must be a number in \[0, 1\]"):
        number("x", value, 0, 1)

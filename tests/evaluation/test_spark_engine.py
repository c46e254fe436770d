"""The Spark engine's checks that need no Spark session (tests/integration/test_spark.py runs
Spark itself)."""

from __future__ import annotations

import math
import sys

import pytest

from llm_packager.evaluation.spark_engine import (
    LOCAL_ONLY_METRICS,
    SparkUnavailableError,
    local_only_unmeasured,
    spark_session,
)
from llm_packager.keys import DECODE_TOKENS_PER_S_METRIC, TOKEN_F1_METRIC, TTFT_S_METRIC


def test_without_java_the_session_is_refused_naming_java(tmp_path, monkeypatch):
    # pyspark itself would start `bin/spark-submit`, which dies with "JAVA_HOME is not set"
    # after a while; the engine says so before, in one line.
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SparkUnavailableError, match="Java runtime"):
        spark_session("local[1]")


def test_without_pyspark_the_session_is_refused_naming_the_fix(monkeypatch):
    # An environment made from requirements.txt (the Databricks bundle's job) has no pyspark: the
    # error names the package to install and the engine that needs none.
    monkeypatch.setitem(sys.modules, "pyspark.sql", None)  # `import` then raises ImportError
    with pytest.raises(SparkUnavailableError) as refused:
        spark_session("local[1]")
    message = str(refused.value)
    assert "pyspark==4.3.0" in message and "evaluate.engine=local" in message


def test_only_the_local_only_figures_become_unmeasured():
    measured = {TOKEN_F1_METRIC: 0.5, DECODE_TOKENS_PER_S_METRIC: 12.0, TTFT_S_METRIC: 0.1}
    marked = local_only_unmeasured(measured)
    assert marked[TOKEN_F1_METRIC] == 0.5 and marked[DECODE_TOKENS_PER_S_METRIC] == 12.0
    assert set(LOCAL_ONLY_METRICS) <= set(marked)
    assert all(math.isnan(marked[metric]) for metric in LOCAL_ONLY_METRICS)
    assert measured[TTFT_S_METRIC] == 0.1  # the judge's own figures are left as they were

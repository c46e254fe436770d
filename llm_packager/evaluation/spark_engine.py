"""Answering the evaluation set on Spark (``evaluate.engine=spark``), and the chat types a Spark
DataFrame of requests and answers uses.

The set becomes a DataFrame of requests (`REQUEST_DDL`: ``messages`` as
``array<struct<role,content>>`` and an int ``max_tokens``), split into partitions; each candidate
answers it through a pandas UDF that loads the model once per task (partition) with
``mlflow.pyfunc.load_model`` and hands ``predict`` the same request dicts the local worker does
(`EvalExample.chat_request`), so greedy answers equal the local engine's. The result is shaped like
the local worker's output (``llm_packager.evaluation.worker``), so `judge`, the report and
``evaluation.json`` follow unchanged.

Why not ``mlflow.pyfunc.spark_udf`` here: MLflow 3.17's transformers flavor refuses the requests it
hands over (Arrow gives ``messages`` as a numpy array, and ``convert_messages_to_prompt`` accepts a
list only: "Input messages should be list of dictionaries, but got: <class 'numpy.ndarray'>").
The ONNX model accepts them; its champion goes through MLflow's own UDF in the batch-inference
recipe (docs/spark.md) with `CHAT_COMPLETION_DDL` as the result type.

Speed figures that only mean something for one local process (`LOCAL_ONLY_METRICS`: time to
first token, latency percentiles, load time, peak memory) are not measured on Spark: they are NaN
in its metrics, and a gate may not name them.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from llm_packager.errors import UserError
from llm_packager.evaluation.scoring import EvalExample
from llm_packager.keys import (
    LATENCY_P50_S_METRIC,
    LATENCY_P95_S_METRIC,
    LOAD_SECONDS_METRIC,
    MODEL_SIZE_BYTES_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
    PEAK_RSS_LOAD_MIB_METRIC,
    TTFT_S_METRIC,
)

# A chat request as a Spark row: what the evaluation set's requests hold (greedy: no sampling
# fields), and what the batch-inference recipe's table holds.
REQUEST_DDL = "messages array<struct<role:string,content:string>>, max_tokens int"
# An OpenAI chat completion as a Spark struct: the UDF's documented result type. MLflow infers a
# struct from the chat signature's output schema, but that struct holds every optional field
# (message.name, tool_calls, ...) and MLflow's conversion raises KeyError on the first one a
# completion leaves out, so the result type names only the fields every completion carries.
CHAT_COMPLETION_DDL = (
    "id string, object string, created long, model string, "
    "choices array<struct<index:long, message:struct<role:string, content:string>, "
    "finish_reason:string>>, "
    "usage struct<prompt_tokens:long, completion_tokens:long, total_tokens:long>"
)
# Measured per request or per process by the local engine; on Spark a request shares its batch,
# its worker and its machine with others, so these figures would not mean the same thing.
LOCAL_ONLY_METRICS = (
    TTFT_S_METRIC,
    LATENCY_P50_S_METRIC,
    LATENCY_P95_S_METRIC,
    LOAD_SECONDS_METRIC,
    PEAK_RSS_LOAD_MIB_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
)
SPARK_NOTE = (
    "Answered on Spark (evaluate.engine=spark): " + ", ".join(LOCAL_ONLY_METRICS)
    + " are measured by the local engine only (NaN here), and so are the teacher-forced "
    "figures; decode_tokens_per_s is the "
    "candidate's throughput over the whole Spark job."
)  # fmt: skip


class SparkUnavailableError(UserError, RuntimeError):
    """Spark cannot start here: pyspark or Java is missing; the message says which."""


def spark_session(master: str = ""):
    """The active Spark session, or a new one (``master``: e.g. ``local[2]``; empty: this
    process's active session, if any, else ``local[*]``; a step's process on Databricks has none
    and cannot make one there, docs/spark.md).

    Raises:
        SparkUnavailableError: pyspark is not installed, or no Java runtime is found for it.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as error:
        raise SparkUnavailableError(
            "evaluate.engine=spark needs pyspark, which this environment lacks: install "
            "pyspark==4.3.0 (requirements-dev.txt), or use evaluate.engine=local (the Databricks "
            "bundle's job has no pyspark, docs/spark.md)"
        ) from error
    active = SparkSession.getActiveSession()
    if active is not None and not master:
        return active
    if not os.environ.get("JAVA_HOME") and shutil.which("java") is None:
        raise SparkUnavailableError(
            "Spark needs a Java runtime (17 or later) and none was found: no JAVA_HOME and no "
            "`java` on PATH"
        )
    master = master or "local[*]"
    builder = SparkSession.builder.appName("llm-packager").master(master)
    if master.startswith("local"):
        # Local Python workers run this interpreter (its packages), not whichever python3 is
        # first on PATH: pyspark hands each UDF the driver's PYSPARK_PYTHON, read when the
        # SparkContext starts (a cluster's executors have their own).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return builder.getOrCreate()


def local_only_unmeasured(metrics: dict[str, float]) -> dict[str, float]:
    """A candidate's metrics with the local-only figures set to NaN (not measured)."""
    return {**metrics, **dict.fromkeys(LOCAL_ONLY_METRICS, math.nan)}


def _answer_udf(archive_name: str, batch_size: int):
    """A pandas UDF answering chat requests with the model shipped as ``archive_name``: defined in
    a function so that Spark pickles it by value (the executors need not have this project)."""
    from pyspark.sql.functions import pandas_udf

    # The hints make it an iterator UDF (pyspark reads them): one DataFrame per Arrow batch in,
    # one out, and the model loaded before the first.
    @pandas_udf(CHAT_COMPLETION_DDL)
    def answer(requests: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import mlflow
        from pyspark import SparkFiles

        # Loaded once per task (one partition, many Arrow batches), not per batch.
        model = mlflow.pyfunc.load_model(SparkFiles.get(archive_name))
        for batch in requests:
            chat_requests = [
                {"messages": [dict(message) for message in row.messages],
                 "max_tokens": int(row.max_tokens)}
                for row in batch.itertuples(index=False)
            ]  # fmt: skip
            # At most batch_size requests a predict call, as the local engine does: an Arrow
            # batch holds up to 10,000 rows, and the ONNX model refuses more than
            # max_batch_size + max_queued_requests at once (llm_packager/serving/decode_loop.py).
            completions = [
                completion
                for start in range(0, len(chat_requests), batch_size)
                for completion in model.predict(chat_requests[start : start + batch_size])
            ]
            # Only the fields of the result type: a transformers completion carries more.
            yield pd.DataFrame([
                {**completion, "choices": [
                    {"index": choice["index"], "finish_reason": choice["finish_reason"],
                     "message": {"role": choice["message"]["role"],
                                 "content": choice["message"]["content"]}}
                    for choice in completion["choices"]
                ]}
                for completion in completions
            ])  # fmt: skip

    return answer


def answer_on_spark(
    spark,
    model_uri: str,
    examples: list[EvalExample],
    *,
    max_tokens: int,
    partitions: int,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Answer ``examples`` greedily with the model at ``model_uri``, the requests split into
    ``partitions`` partitions and handed to ``predict`` ``batch_size`` at a time; return the
    local worker's output shape (answers in the set's order), with the local-only figures left
    unmeasured (None/NaN)."""
    import mlflow
    from pyspark.sql.functions import struct

    from llm_packager.sources.manifest import folder_bytes

    rows = [
        (index, request["messages"], request["max_tokens"])
        for index, request in enumerate(example.chat_request(max_tokens) for example in examples)
    ]
    requests = spark.createDataFrame(rows, f"position int, {REQUEST_DDL}").repartition(
        max(partitions, 1)
    )
    with tempfile.TemporaryDirectory(prefix="spark-model-") as scratch:
        download = Path(scratch) / "download"
        download.mkdir()
        # The model's folder: `download` itself (models:/ URIs) or a folder in it (runs:/).
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(download)))
        # addFile ships the folder to every executor (a cluster's workers cannot read the
        # driver's disk) under its own name: a unique one keeps two candidates' folders apart.
        shipped = Path(scratch) / f"model-{time.time_ns()}"
        local.rename(shipped)
        spark.sparkContext.addFile(str(shipped), recursive=True)
        started = time.perf_counter()
        answer = _answer_udf(shipped.name, max(batch_size, 1))
        answered = requests.select(
            "position", answer(struct("messages", "max_tokens")).alias("answer")
        ).collect()
        seconds = time.perf_counter() - started
        size = folder_bytes(shipped)
    answered.sort(key=lambda row: row.position)
    answers = [
        {
            "id": example.id,
            "answer": row.answer.choices[0].message.content,
            "completion_tokens": row.answer.usage.completion_tokens,
            "finish_reason": row.answer.choices[0].finish_reason,
            # The job's time spread over its answers: the throughput decode_tokens_per_s is
            # computed from; no single request's latency is measured on Spark.
            "latency_s": seconds / len(examples),
        }
        for example, row in zip(examples, answered, strict=True)
    ]
    return {
        "model_uri": model_uri,
        MODEL_SIZE_BYTES_METRIC: size,
        LOAD_SECONDS_METRIC: math.nan,
        PEAK_RSS_LOAD_MIB_METRIC: math.nan,
        PEAK_RSS_GENERATE_MIB_METRIC: math.nan,
        TTFT_S_METRIC: None,
        "answers": answers,
    }

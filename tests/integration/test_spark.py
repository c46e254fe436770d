"""Both flavors as Spark UDFs, and `evaluate` on Spark, on local pyspark (issue #27).

Local mode (``local[2]``) runs the same pandas-UDF code path a cluster runs, in one JVM: Arrow
batches of rows handed to Python workers, each loading the model once. No Spark double: this is
pyspark 4.3.0 itself (requirements-dev.txt). Without Java these tests fail, naming it (the
session fixture calls `spark_session`, which raises `SparkUnavailableError`); they do not skip.

MLflow's behaviour these tests pin, read from mlflow 3.17.2 as installed
(``mlflow/pyfunc/__init__.py``, ``spark_udf``): separate column arguments are named in the
signature's input order and every signature column not given is filled with NaN; one struct
argument is handed over as a DataFrame of its own fields only; an inferred struct result type is
converted field by field (``_convert_struct_values``, KeyError on a field a completion leaves out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import mlflow
import pytest

from llm_packager.choices import EvaluationEngine
from llm_packager.config.specs import EvaluateParameters
from llm_packager.errors import InvalidParametersError
from llm_packager.evaluation.metrics import parse_gate
from llm_packager.evaluation.spark_engine import (
    CHAT_COMPLETION_DDL,
    LOCAL_ONLY_METRICS,
    REQUEST_DDL,
    spark_session,
)
from llm_packager.keys import (
    CONTAINS_REFERENCE_METRIC,
    EXACT_MATCH_METRIC,
    IDENTICAL_RATE_METRIC,
    MODEL_URI_TAG,
    TOKEN_AGREEMENT_METRIC,
    TOKEN_F1_METRIC,
)
from llm_packager.project import PROJECT_DIR
from steps.evaluate import evaluate

PARTITIONS = 2
MAX_TOKENS = 8
# Every quality figure the engines must agree on (greedy decoding: same answers, same scores).
QUALITY_AND_AGREEMENT = (
    EXACT_MATCH_METRIC, CONTAINS_REFERENCE_METRIC, TOKEN_F1_METRIC, IDENTICAL_RATE_METRIC,
    TOKEN_AGREEMENT_METRIC,
)  # fmt: skip
QUESTIONS = ("What is the capital of Spain?", "Name a prime number.", "What is 2 plus 2?",
             "Say hello.", "What colour is the sky?")  # fmt: skip


@pytest.fixture(scope="module")
def spark() -> Iterator:
    session = spark_session(f"local[{PARTITIONS}]")
    # Two rows per Arrow batch: each Python worker gets more than one batch, as on a cluster.
    session.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "2")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def champions(logged_models) -> Iterator[tuple[str, dict[str, str]]]:
    """Each flavor's logged model registered with the alias ``champion``, as `register` leaves
    it: (tracking URI, ``{flavor: models:/<name>@champion}``)."""
    uri, runs = logged_models
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        registered = {}
        for flavor, step in (("onnx", "log_onnx"), ("transformers", "log_transformers")):
            name = f"tiny-random-phi3-chat-{flavor}"
            if not client.search_model_versions(f"name='{name}'"):
                model_uri = client.get_run(runs[step]).data.tags[MODEL_URI_TAG]
                version = mlflow.register_model(model_uri, name)
                client.set_registered_model_alias(name, "champion", version.version)
            registered[flavor] = f"models:/{name}@champion"
        yield uri, registered


def _requests(spark):
    rows = [([{"role": "user", "content": question}], MAX_TOKENS) for question in QUESTIONS]
    frame = spark.createDataFrame(rows, REQUEST_DDL).repartition(PARTITIONS)
    assert frame.rdd.getNumPartitions() == PARTITIONS
    assert dict(frame.dtypes)["max_tokens"] == "int"
    return frame


def _predicted(model_uri: str) -> dict[str, str]:
    model = mlflow.pyfunc.load_model(model_uri)
    requests = [{"messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS}
                for question in QUESTIONS]  # fmt: skip
    completions = model.predict(requests)
    return {question: completion["choices"][0]["message"]["content"]
            for question, completion in zip(QUESTIONS, completions, strict=True)}  # fmt: skip


def test_the_onnx_champion_answers_a_dataframe_through_mlflows_spark_udf_as_predict_does(
    spark, champions
):
    from pyspark.sql.functions import struct

    _, registered = champions
    answer = mlflow.pyfunc.spark_udf(spark, registered["onnx"], env_manager="local",
                                     result_type=CHAT_COMPLETION_DDL)  # fmt: skip
    answered = _requests(spark).withColumn("completion", answer(struct("messages", "max_tokens")))
    rows = answered.select("messages", "completion").collect()

    by_question = {row.messages[0].content: row.completion for row in rows}
    assert sorted(by_question) == sorted(QUESTIONS)
    for completion in by_question.values():
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.role == "assistant"
        assert 1 <= completion.usage.completion_tokens <= MAX_TOKENS
    spark_answers = {question: completion.choices[0].message.content
                     for question, completion in by_question.items()}  # fmt: skip
    assert spark_answers == _predicted(registered["onnx"])


def _recipe(heading: str) -> str:
    """The first Python block under ``heading`` in docs/spark.md, as a user would copy it."""
    text = (PROJECT_DIR / "docs" / "spark.md").read_text()
    section = text[text.index(heading) :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_batch_inference_recipe_writes_predicts_answers_beside_the_prompts(
    spark, champions, tmp_path
):
    """docs/spark.md's recipe run as written, but for the champion's name and the tables' paths
    (Spark resolves a relative path against its JVM's working folder, not Python's): the
    champion over a Parquet table of 2 partitions, with an int max_tokens column, through
    MLflow's own UDF; the answers written beside the prompts equal predict's."""
    _, registered = champions
    code = _recipe("## Batch inference: the champion over a table")
    names = {"models:/tiny-random-phi3-chat@champion": registered["onnx"],
             '"prompts.parquet"': repr(str(tmp_path / "prompts.parquet")),
             '"answers.parquet"': repr(str(tmp_path / "answers.parquet"))}  # fmt: skip
    for documented, ours in names.items():
        assert documented in code, (documented, code)
        code = code.replace(documented, ours)
    _requests(spark).write.parquet(str(tmp_path / "prompts.parquet"))
    # The documented code itself, so that the docs and this test cannot drift apart.
    exec(code, {})

    written = spark.read.parquet(str(tmp_path / "answers.parquet"))
    assert {"messages", "max_tokens", "completion", "answer"} <= set(written.columns)
    answers = {row.messages[0].content: row.answer for row in written.collect()}
    assert answers == _predicted(registered["onnx"])


def test_separate_columns_reproduce_the_reported_failure_on_max_tokens(spark, champions):
    """Issue #27's call: columns given one by one are matched to the signature's order, so the
    int column becomes `temperature` and `max_tokens` is a column of NaN."""
    _, registered = champions
    answer = mlflow.pyfunc.spark_udf(spark, registered["onnx"], env_manager="local",
                                     result_type=CHAT_COMPLETION_DDL)  # fmt: skip
    with pytest.raises(Exception, match="Can not safely convert float64 to int64"):
        _requests(spark).withColumn("completion", answer("messages", "max_tokens")).collect()


def test_mlflows_transformers_flavor_refuses_the_messages_spark_hands_it(spark, champions):
    """MLflow 3.17's limit, not ours (docs/spark.md): when this fails, MLflow takes the array
    Spark gives, and the transformers champion can join the UDF test above."""
    from pyspark.sql.functions import struct

    _, registered = champions
    answer = mlflow.pyfunc.spark_udf(spark, registered["transformers"], env_manager="local",
                                     result_type=CHAT_COMPLETION_DDL)  # fmt: skip
    refusal = "Input messages should be list of dictionaries, but got: <class 'numpy.ndarray'>"
    with pytest.raises(Exception, match=re.escape(refusal)):
        _requests(spark).withColumn(
            "completion", answer(struct("messages", "max_tokens"))
        ).collect()


def _evaluate(runs: dict, engine: EvaluationEngine, gate: str):
    request = EvaluateParameters(
        candidate_run_ids=(runs["log_transformers"], runs["log_onnx"]),
        reference="transformers", limit=6, max_tokens=MAX_TOKENS, ttft_requests=1,
        gate=parse_gate(gate), engine=engine, spark_master=f"local[{PARTITIONS}]",
        spark_partitions=PARTITIONS,
    )  # fmt: skip
    with mlflow.start_run(experiment_id=runs["experiment_id"]) as run:
        return evaluate(request, run.info.run_id)


def test_evaluate_on_spark_gives_the_local_engines_quality_figures_and_verdicts(
    spark, logged_models_tracking
):
    """The reference agrees with itself (identical_rate 1.0); the int4 ONNX build of random
    weights does not give the same answers on every prompt, so the gate keeps one and rejects
    the other on the same figures, on both engines."""
    _, runs = logged_models_tracking
    gate = f"{IDENTICAL_RATE_METRIC}>=1.0"
    local = _evaluate(runs, EvaluationEngine.local, gate)
    on_spark = _evaluate(runs, EvaluationEngine.spark, gate)

    verdicts = {engine: {c.name: c.verdict.status for c in evaluation.candidates}
                for engine, evaluation in (("local", local), ("spark", on_spark))}  # fmt: skip
    assert verdicts["local"] == {"transformers": "passed", "onnx": "rejected"}
    assert verdicts["spark"] == verdicts["local"]
    for name in ("transformers", "onnx"):
        local_figures = local.candidate(name).metrics
        spark_figures = on_spark.candidate(name).metrics
        assert {metric: spark_figures[metric] for metric in QUALITY_AND_AGREEMENT} == {
            metric: local_figures[metric] for metric in QUALITY_AND_AGREEMENT
        }
        assert all(math.isnan(spark_figures[metric]) for metric in LOCAL_ONLY_METRICS)
        assert not any(math.isnan(local_figures[metric]) for metric in LOCAL_ONLY_METRICS)
    assert any("evaluate.engine=spark" in note for note in on_spark.notes)


def test_a_gate_on_a_figure_spark_does_not_measure_is_refused(spark, logged_models_tracking):
    _, runs = logged_models_tracking
    with pytest.raises(InvalidParametersError, match="does not measure ttft_s"):
        _evaluate(runs, EvaluationEngine.spark, "ttft_s<=1.0")
    # The teacher-forced figures are the local engine's too.
    with pytest.raises(InvalidParametersError, match="does not measure kld_mean"):
        _evaluate(runs, EvaluationEngine.spark, "kld_mean<=0.05")

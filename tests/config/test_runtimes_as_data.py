"""A runtime is one declaration: main plans its log step, the memory check sizes it, evaluate takes
its runs, register knows its flavor and the config is checked by its rules, with no other edit
(llm_packager.config.specs).

The fixture declares a throwaway runtime, ``echo``, by adding one `RuntimeDefinition` to
``RUNTIMES``. Its figures are chosen to differ from every real runtime's, so code that still
branched on step or runtime names would plan, size or describe it wrongly and fail here.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, fields

import pytest

import steps.register
from llm_packager.choices import ModelStore, RecommendationPolicy, TorchDtype
from llm_packager.config import specs
from llm_packager.config.compose import ConfigError, compose_config
from llm_packager.config.parameters import computed, parameter, upstream
from llm_packager.config.specs import (
    EvaluateParameters,
    RuntimeDefinition,
    UnknownRuntimeError,
    candidate_names,
    runtime_named,
    upstream_steps,
)
from llm_packager.evaluation.metrics import PASSED, Verdict
from llm_packager.evaluation.record import CandidateResult, Evaluation, Recommendation
from llm_packager.models.memory_parts import MemoryPart, StepMemory
from llm_packager.pipeline.driver import plan_pipeline, select_steps
from llm_packager.pipeline.memory_budget import NotEnoughMemoryError, check_memory, step_memory

PARAMETERS = 1_000_000_000
FLOAT32 = 4


@dataclass(frozen=True, kw_only=True)
class LogEchoParameters:
    """Log a model that answers with what it is told, with a greeting first."""

    fetch_model_run_id: str = upstream("the fetch_model run", "fetch_model")
    candidate: str = computed("this model's name among the evaluated candidates", "echo")
    model_store: ModelStore = computed("where the model goes", ModelStore.logged_models)
    greeting: str = parameter("what the model says first", "hello")


# Larger than any real part, so the memory check names these when they are used.
ECHO_LOGGING = MemoryPart(
    what="logging the echo model", fixed_mib=50_000, loaded_copies=0, float32_copies=3,
    loads_weights_as="", fix="echo.greeting=''",
)  # fmt: skip
ECHO_ANSWERING = MemoryPart(
    what="the echo model answering", fixed_mib=40_000, loaded_copies=0, float32_copies=2,
    loads_weights_as="", fix="a shorter echo",
)  # fmt: skip


def _echo_candidates(cfg) -> dict[str, dict[str, str]]:
    # Two candidates, as onnx has with a variant: the runtime's own name and one named variant.
    return {"echo": {"greeting": "hi"}, "echo-loud": {"greeting": "HI"}}


def _echo_memory(values: LogEchoParameters, transformers_dtype: TorchDtype) -> StepMemory:
    return StepMemory((ECHO_LOGGING,))


@pytest.fixture
def echo(monkeypatch) -> RuntimeDefinition:
    runtime = RuntimeDefinition(
        name="echo",
        parameters=LogEchoParameters,
        section="echo",
        candidates=_echo_candidates,
        flavor="python_function (echo)",
        log_memory=_echo_memory,
        model_memory=ECHO_ANSWERING,
    )
    monkeypatch.setattr(specs, "RUNTIMES", (*specs.RUNTIMES, runtime))
    return runtime


def test_main_plans_one_run_of_the_new_log_step_per_candidate(echo):
    cfg = compose_config("tiny-random-phi3", "")
    plan = plan_pipeline(cfg, store=ModelStore.run_artifacts)
    names = [planned.name for planned in plan]
    # After the other log steps, before evaluate, which takes their runs.
    assert names.index("log_onnx") < names.index("log_echo") < names.index("evaluate")
    echo_runs = {planned.name: planned for planned in plan if planned.definition is echo.log_step}
    assert list(echo_runs) == ["log_echo", "log_echo:loud"]
    assert echo_runs["log_echo"].values == {
        "greeting": "hi", "candidate": "echo", "model_store": ModelStore.run_artifacts
    }  # fmt: skip
    assert echo_runs["log_echo:loud"].values["candidate"] == "echo-loud"
    assert echo_runs["log_echo:loud"].values["greeting"] == "HI"
    assert "log_echo" in select_steps("all")
    assert candidate_names(cfg)[-2:] == ["echo", "echo-loud"]
    evaluate_upstream = next(f for f in fields(EvaluateParameters) if f.name == "candidate_run_ids")
    assert "log_echo" in upstream_steps(evaluate_upstream)


def test_the_memory_check_sizes_the_new_runtime_from_its_declared_parts(echo):
    values = LogEchoParameters(fetch_model_run_id="unused", greeting="hi")
    logging = step_memory("log_echo", values, TorchDtype.auto)
    assert logging.parts == (ECHO_LOGGING,)
    assert logging.need_mib(ECHO_LOGGING, PARAMETERS, 2) == pytest.approx(
        50_000 + PARAMETERS * 3 * FLOAT32 / 2**20
    )
    with pytest.raises(NotEnoughMemoryError, match="logging the echo model"):
        check_memory("log_echo", logging, PARAMETERS, 2, available_mib=60_000)
    # evaluate and register may load any runtime's model: the echo model is sized there too.
    evaluating = step_memory("evaluate", None, TorchDtype.auto)
    assert ECHO_ANSWERING in evaluating.parts
    with pytest.raises(NotEnoughMemoryError, match="the echo model answering"):
        check_memory("evaluate", evaluating, PARAMETERS, 2, available_mib=45_000)


def test_register_finds_the_new_runtimes_flavor_and_log_step(echo):
    assert runtime_named("echo").flavor == "python_function (echo)"
    # Its version's lineage tag run.<log step> names this step.
    assert runtime_named("echo").log_step.entry_point == "log_echo"
    # register looks flavors up by runtime; it keeps no table of its own that would miss one.
    source = inspect.getsource(steps.register)
    assert "runtime_named(" in source
    for runtime in specs.RUNTIMES:
        assert runtime.flavor not in source


def test_the_config_is_checked_by_the_new_runtimes_own_rules(echo, monkeypatch):
    def refuse(cfg) -> None:
        raise ConfigError("echo.greeting must not be empty")

    strict = dataclasses.replace(echo, check=refuse)
    monkeypatch.setattr(specs, "RUNTIMES", (*specs.RUNTIMES[:-1], strict))
    with pytest.raises(ConfigError, match=r"echo\.greeting must not be empty"):
        compose_config("tiny-random-phi3", "")


def test_evaluation_json_carries_the_new_runtime_and_an_undeclared_one_is_named(echo):
    # evaluate hands register the runtime's name in evaluation.json; no enum has to learn it.
    candidate = CandidateResult(
        name="echo", runtime="echo", model_uri="models:/m-1", run_id="r1",
        metrics={"exact_match": 1.0}, verdict=Verdict(PASSED),
    )  # fmt: skip
    evaluation = Evaluation(
        candidates=(candidate,), reference="echo",
        recommendation=Recommendation(RecommendationPolicy.best_quality_passed, "echo", "only one"),
        random_weights=False, dataset="data/eval_set.jsonl", dataset_sha256="0" * 64,
    )  # fmt: skip
    parsed = Evaluation.from_json(evaluation.to_json())
    assert runtime_named(parsed.candidate("echo").runtime) is echo
    with pytest.raises(UnknownRuntimeError, match=r"no runtime is named 'mystery'.*echo"):
        runtime_named("mystery")

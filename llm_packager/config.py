"""Composing and validating the Hydra configuration. Only the `main` entry point imports this.

The YAML under ``conf/`` is merged onto a typed schema, so an unknown key, a value of the wrong
type or an unknown choice fails here, as one line naming the key, before any step run exists.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm_packager.hub import UnpinnedRevisionError, require_pinned_revision
from llm_packager.manifest import ModelFilesError, check_model_files
from llm_packager.registry import RegistryNameError, check_alias, check_registered_model_name

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
SYNTHETIC_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "seed",
)


class ConfigError(ValueError):
    """The composed configuration is invalid; the message is one line naming the key."""


# `${identifier:${model.name}}` in conf/: a model name as a Unity Catalog name part, whose
# characters are letters, digits and underscores (phi3-mini-4k-instruct -> phi3_mini_4k_instruct).
OmegaConf.register_new_resolver(
    "identifier", lambda text: re.sub(r"[^A-Za-z0-9_]", "_", str(text)), replace=True
)


class ModelSource(Enum):
    hub = "hub"
    local = "local"
    synthetic = "synthetic"


class OnnxSource(Enum):
    prebuilt = "prebuilt"
    build = "build"


class OnnxPrecision(Enum):
    int4 = "int4"
    int8 = "int8"
    fp16 = "fp16"
    fp32 = "fp32"


class ExecutionProvider(Enum):
    cpu = "cpu"
    cuda = "cuda"


class Device(Enum):
    cpu = "cpu"
    cuda = "cuda"


class TorchDtype(Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = MISSING
    repo_id: str | None = None
    revision: str | None = None
    allow_unpinned_revision: bool = False
    allow_patterns: list[str] = field(default_factory=list)
    local_dir: str | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    seed: int | None = None


@dataclass
class GenerationConfig:
    """Generation defaults baked into a logged model; a request's own values override them."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class OnnxConfig:
    source: OnnxSource = MISSING
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    allow_patterns: list[str] = field(default_factory=list)
    precision: OnnxPrecision = OnnxPrecision.int4
    execution_provider: ExecutionProvider = ExecutionProvider.cpu
    extra_options: dict[str, str] = field(default_factory=dict)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_tokens_cap: int = 1024
    max_batch_size: int = 8
    intra_op_num_threads: int = 0
    agreement_tokens: int = 16


class GateDirection(Enum):
    higher = "higher"
    lower = "lower"


class RecommendationPolicy(Enum):
    fastest_passed = "fastest_passed"
    best_quality_passed = "best_quality_passed"
    smallest_passed = "smallest_passed"


@dataclass
class GateThreshold:
    threshold: float = MISSING
    direction: GateDirection = MISSING


@dataclass
class EvaluateConfig:
    dataset: str = "data/eval_set.jsonl"
    limit: int = 0
    max_tokens: int = 32
    batch_size: int = 1
    ttft_requests: int = 5
    recommendation: RecommendationPolicy = RecommendationPolicy.fastest_passed
    gate: dict[str, GateThreshold] = field(default_factory=dict)


@dataclass
class RegisterConfig:
    registered_model_name: str = MISSING
    alias: str = "champion"
    challenger_alias: str = "challenger"
    allow_unvalidated: bool = False
    registry_uri: str = ""


@dataclass
class TransformersConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # False logs a Hub model by reference (repo + commit, no weights copied); see README.
    save_pretrained: bool = True
    # Where the step loads and checks the model, and the dtype the logged model loads with.
    device: Device = Device.cpu
    dtype: TorchDtype = TorchDtype.auto


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    transformers: TransformersConfig = field(default_factory=TransformersConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _schema_error(error: OmegaConfBaseException) -> ConfigError:
    key = getattr(error, "full_key", None) or "?"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ConfigError(f"Invalid config at '{key}': {reason}")


def compose_config(model: str, overrides: str) -> DictConfig:
    """Compose ``conf/`` for a model choice plus overrides given as one shell-quoted string.

    Raises:
        ConfigError: an unknown group choice, unknown key, bad type or bad value, in one line.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        override_list = [f"model={model}", *shlex.split(overrides)]
    except ValueError as error:
        raise ConfigError(f"Cannot split overrides {overrides!r}: {error}") from error
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed = compose(config_name="config", overrides=override_list)
    except MissingConfigException as error:
        group = "model" if f"model/{model}" in str(error) else "config group"
        options = ", ".join(sorted(error.options or []))
        raise ConfigError(
            f"Unknown {group} choice in {override_list}; available: {options or 'see conf/'}"
        ) from error
    except HydraException as error:
        cause = error.__cause__
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            raise ConfigError(
                f"Unknown config key '{cause.full_key}' in overrides {overrides!r}"
            ) from error
        raise ConfigError(_one_line(error)) from error
    try:
        typed = OmegaConf.merge(OmegaConf.structured(PipelineConfig), composed)
    except OmegaConfBaseException as error:
        raise _schema_error(error) from error
    validate_config(typed)
    return typed


def validate_config(cfg: DictConfig) -> None:
    """Check the rules a schema cannot express: which keys each source needs, pinned revisions,
    a local model folder that exists and holds real files.

    Raises:
        ConfigError: naming the key at fault.
    """
    model = cfg.model
    synthetic = model.source == ModelSource.synthetic
    for key in SYNTHETIC_SIZE_KEYS:
        value = model[key]
        if synthetic and value is None:
            raise ConfigError(f"model.{key} must be set when model.source=synthetic")
        if not synthetic and value is not None:
            raise ConfigError(f"model.{key} is only used when model.source=synthetic")
    if model.source == ModelSource.hub:
        if not model.repo_id:
            raise ConfigError("model.repo_id must be set when model.source=hub")
        try:
            require_pinned_revision(
                model.repo_id, model.revision or "", allow_unpinned=model.allow_unpinned_revision
            )
        except UnpinnedRevisionError as error:
            raise ConfigError(f"model.revision: {error}") from error
    if model.source == ModelSource.local:
        if not model.local_dir:
            raise ConfigError("model.local_dir must be set when model.source=local")
        try:
            check_model_files(Path(model.local_dir).expanduser())
        except ModelFilesError as error:
            raise ConfigError(f"model.local_dir: {error}") from error
    _validate_generation(cfg.transformers.generation, "transformers.generation")
    if not cfg.transformers.save_pretrained and model.source != ModelSource.hub:
        raise ConfigError(
            "transformers.save_pretrained=false logs a Hub model by reference and needs "
            f"model.source=hub (model.source is {model.source.value})"
        )
    _validate_onnx(cfg.onnx)
    _validate_evaluate(cfg.evaluate)
    register = cfg.register
    try:
        check_registered_model_name(register.registered_model_name, register.registry_uri)
        check_alias(register.alias)
        if register.challenger_alias:
            check_alias(register.challenger_alias)
    except RegistryNameError as error:
        raise ConfigError(f"register: {error}") from error
    if register.alias == register.challenger_alias:
        raise ConfigError("register.alias and register.challenger_alias must differ")


def _validate_onnx(onnx: DictConfig) -> None:
    _validate_generation(onnx.generation, "onnx.generation")
    if onnx.max_tokens_cap < onnx.generation.max_new_tokens:
        raise ConfigError(
            f"onnx.max_tokens_cap ({onnx.max_tokens_cap}) must be at least "
            f"onnx.generation.max_new_tokens ({onnx.generation.max_new_tokens})"
        )
    if onnx.max_batch_size < 1:
        raise ConfigError(f"onnx.max_batch_size must be 1 or more; got {onnx.max_batch_size}")
    if onnx.intra_op_num_threads < 0:
        raise ConfigError(
            "onnx.intra_op_num_threads must be 0 (all cores) or more; "
            f"got {onnx.intra_op_num_threads}"
        )
    if onnx.agreement_tokens < 0:
        raise ConfigError("onnx.agreement_tokens must be 0 (skip) or more")
    if onnx.source == OnnxSource.prebuilt:
        if not onnx.repo_id or not onnx.subfolder:
            raise ConfigError(
                "onnx.repo_id and onnx.subfolder must be set when onnx.source=prebuilt"
            )
        try:
            require_pinned_revision(onnx.repo_id, onnx.revision or "", allow_unpinned=False)
        except UnpinnedRevisionError as error:
            raise ConfigError(f"onnx.revision: {error}") from error


def _validate_evaluate(evaluate: DictConfig) -> None:
    from llm_packager.evaluation import MODEL_METRICS, EvalSetError, resolve_eval_set

    for key in ("max_tokens", "batch_size"):
        if evaluate[key] < 1:
            raise ConfigError(f"evaluate.{key} must be at least 1")
    for key in ("limit", "ttft_requests"):
        if evaluate[key] < 0:
            raise ConfigError(f"evaluate.{key} must be 0 or more")
    for metric in evaluate.gate:
        if metric not in MODEL_METRICS:
            raise ConfigError(
                f"evaluate.gate.{metric}: unknown metric; known: {', '.join(MODEL_METRICS)}"
            )
    try:
        resolve_eval_set(evaluate.dataset)
    except EvalSetError as error:
        raise ConfigError(f"evaluate.dataset: {error}") from error


def _validate_generation(generation: DictConfig, prefix: str) -> None:
    if generation.max_new_tokens < 1:
        raise ConfigError(f"{prefix}.max_new_tokens must be at least 1")
    if generation.temperature <= 0:
        raise ConfigError(f"{prefix}.temperature must be greater than 0")
    if not 0 < generation.top_p <= 1:
        raise ConfigError(f"{prefix}.top_p must be in (0, 1]")


def config_as_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML, as logged on main's run."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig) -> str:
    """A sha256 of the resolved configuration, independent of key order."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return hashlib.sha256(json.dumps(container, sort_keys=True).encode()).hexdigest()


def fetch_model_parameters(cfg: DictConfig) -> dict[str, str | int]:
    """The flat MLproject parameters of the fetch_model step for this configuration."""
    model = cfg.model
    parameters: dict[str, str | int] = {
        "model_name": model.name,
        "source": model.source.value,
        "repo_id": model.repo_id or "",
        "revision": model.revision or "",
        "allow_unpinned_revision": "true" if model.allow_unpinned_revision else "false",
        "allow_patterns": ",".join(model.allow_patterns),
        "local_dir": str(Path(model.local_dir).expanduser().resolve()) if model.local_dir else "",
    }
    for key in SYNTHETIC_SIZE_KEYS:
        parameters[key] = model[key] if model[key] is not None else 0
    return parameters


def log_transformers_parameters(cfg: DictConfig) -> dict[str, str | int | float]:
    """The flat MLproject parameters of the log_transformers step (upstream run id aside)."""
    generation = cfg.transformers.generation
    return {
        "max_new_tokens": generation.max_new_tokens,
        "do_sample": "true" if generation.do_sample else "false",
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "save_pretrained": "true" if cfg.transformers.save_pretrained else "false",
        "device": cfg.transformers.device.value,
        "dtype": cfg.transformers.dtype.value,
    }


def log_onnx_parameters(cfg: DictConfig) -> dict[str, str | int | float]:
    """The flat MLproject parameters of the log_onnx step (upstream run id aside)."""
    from llm_packager.onnx_build import format_extra_options

    onnx = cfg.onnx
    return {
        "source": onnx.source.value,
        "repo_id": onnx.repo_id or "",
        "revision": onnx.revision or "",
        "subfolder": onnx.subfolder or "",
        "allow_patterns": ",".join(onnx.allow_patterns),
        "precision": onnx.precision.value,
        "execution_provider": onnx.execution_provider.value,
        "extra_options": format_extra_options(dict(onnx.extra_options)),
        "max_new_tokens": onnx.generation.max_new_tokens,
        "do_sample": "true" if onnx.generation.do_sample else "false",
        "temperature": onnx.generation.temperature,
        "top_p": onnx.generation.top_p,
        "max_tokens_cap": onnx.max_tokens_cap,
        "max_batch_size": onnx.max_batch_size,
        "intra_op_num_threads": onnx.intra_op_num_threads,
        "agreement_tokens": onnx.agreement_tokens,
    }


def evaluate_parameters(cfg: DictConfig) -> dict[str, str | int | float]:
    """The flat MLproject parameters of the evaluate step (upstream run ids aside). The dataset's
    content hash is one of them, so editing the evaluation set invalidates earlier evaluations."""
    from llm_packager.evaluation import GateRule, file_sha256, format_gate, resolve_eval_set

    evaluate = cfg.evaluate
    rules = [
        GateRule(metric, rule.threshold, rule.direction.value)
        for metric, rule in evaluate.gate.items()
    ]
    return {
        "dataset": evaluate.dataset,
        "dataset_sha256": file_sha256(resolve_eval_set(evaluate.dataset)),
        "limit": evaluate.limit,
        "max_tokens": evaluate.max_tokens,
        "batch_size": evaluate.batch_size,
        "ttft_requests": evaluate.ttft_requests,
        "gate": format_gate(rules),
        "recommendation": evaluate.recommendation.value,
    }


def register_parameters(cfg: DictConfig) -> dict[str, str | int | float]:
    """The flat MLproject parameters of the register step (upstream run id aside)."""
    register = cfg.register
    return {
        "registered_model_name": register.registered_model_name,
        "alias": register.alias,
        "challenger_alias": register.challenger_alias,
        "allow_unvalidated": "true" if register.allow_unvalidated else "false",
        "registry_uri": register.registry_uri,
    }

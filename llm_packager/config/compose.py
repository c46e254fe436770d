"""Composing and validating the Hydra configuration. Only the `main` entry point imports this.

conf/ is composed onto the typed schema built from the step specs (``llm_packager.config.schema``),
so an unknown key, a value of the wrong type or an unknown choice fails here, as one line naming
the key, before any step run exists. The rules a schema cannot express (which keys a source needs,
pinned revisions, a model folder that exists) are checked by `validate_config`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm_packager.choices import ModelSource
from llm_packager.config import schema as config_schema
from llm_packager.config import specs
from llm_packager.config.planning import ConfigError
from llm_packager.evaluation.metrics import MODEL_METRICS
from llm_packager.models.registry import RegistryNameError, check_alias, check_registered_model_name
from llm_packager.project import PROJECT_DIR
from llm_packager.sources.hub import UnpinnedRevisionError, require_pinned_revision
from llm_packager.sources.manifest import ModelFilesError, check_model_files

CONFIG_DIR = PROJECT_DIR / "conf"
SYNTHETIC_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
# What the synthetic model is (llm_packager.sources.synthetic).
SYNTHETIC_ARCHITECTURE = "Phi3ForCausalLM"


# `${identifier:${model.name}}` in conf/: a model name as a Unity Catalog name part, whose
# characters are letters, digits and underscores (phi3-mini-4k-instruct -> phi3_mini_4k_instruct).
OmegaConf.register_new_resolver(
    "identifier", lambda text: re.sub(r"[^A-Za-z0-9_]", "_", str(text)), replace=True
)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _composition_error(error: Exception, overrides: str) -> ConfigError:
    """One line naming the key, whichever layer (Hydra, OmegaConf) refused it."""
    cause = error
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and key:
        reason = str(cause).splitlines()[0]
        if "not in struct" in reason or "not in '" in reason or "is not in" in reason:
            return ConfigError(f"Unknown config key '{key}' in overrides {overrides!r}")
        return ConfigError(f"Invalid config at '{key}': {reason}")
    return ConfigError(_one_line(error))


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
    except (HydraException, OmegaConfBaseException) as error:
        raise _composition_error(error, overrides) from error
    try:
        # Merged onto the typed schema as plain data: this types the open mappings Hydra composed
        # (config_schema) and refuses a key that "+key=value" added. Resolved now, so an
        # interpolation that cannot resolve fails here too.
        typed = OmegaConf.merge(
            OmegaConf.structured(config_schema.PipelineConfig),
            OmegaConf.create(OmegaConf.to_container(composed)),
        )
        OmegaConf.resolve(typed)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"Invalid config at '{key}': {str(error).splitlines()[0]}") from error
    validate_config(typed)
    return typed


def validate_config(cfg: DictConfig) -> None:
    """Check the rules a schema cannot express: which keys each source needs, pinned revisions,
    a local model folder that exists and holds real files. A local folder is made absolute.

    Raises:
        ConfigError: naming the key at fault.
    """
    _validate_model(cfg.model)
    # Each runtime's own rules, in run order (its declaration in llm_packager.config.specs).
    for runtime in specs.RUNTIMES:
        runtime.check(cfg)
    _validate_evaluate(cfg.evaluate, specs.candidate_names(cfg))
    if cfg.tracking.server_timeout_s < 10:
        raise ConfigError(
            "tracking.server_timeout_s must be at least 10 (seconds an MLflow call may wait for "
            "the tracking server, retries included)"
        )
    if cfg.memory.available_mib < 0:
        raise ConfigError("memory.available_mib must be 0 (measure) or a positive number of MiB")
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


def _validate_model(model: DictConfig) -> None:
    synthetic = model.source == ModelSource.synthetic
    if model.source != ModelSource.gguf:
        for key in ("gguf_file", "gguf_package", "gguf_sha256"):
            if model[key]:
                raise ConfigError(f"model.{key} is only used when model.source=gguf")
    for key in SYNTHETIC_SIZE_KEYS:
        if synthetic and model[key] < 1:
            raise ConfigError(f"model.{key} must be set when model.source=synthetic")
        if not synthetic and model[key] != 0:
            raise ConfigError(f"model.{key} is only used when model.source=synthetic")
    if model.seed != 0 and not synthetic:
        raise ConfigError("model.seed is only used when model.source=synthetic")
    if model.weights_dtype != "float32" and not synthetic:
        raise ConfigError("model.weights_dtype is only used when model.source=synthetic")
    if model.source == ModelSource.hub:
        if not model.repo_id:
            raise ConfigError("model.repo_id must be set when model.source=hub")
        try:
            require_pinned_revision(
                model.repo_id, model.revision, allow_unpinned=model.allow_unpinned_revision
            )
        except UnpinnedRevisionError as error:
            raise ConfigError(f"model.revision: {error}") from error
    if model.source == ModelSource.local:
        if not model.local_dir:
            raise ConfigError("model.local_dir must be set when model.source=local")
        folder = Path(model.local_dir).expanduser().resolve()
        try:
            check_model_files(folder)
        except ModelFilesError as error:
            raise ConfigError(f"model.local_dir: {error}") from error
        # The step may run elsewhere (another folder, another process): pass an absolute path.
        model.local_dir = str(folder)
    if model.source == ModelSource.gguf:
        _validate_gguf(model)
    _validate_architecture(model)


def _validate_gguf(model: DictConfig) -> None:
    from llm_packager.sources.gguf import GgufError, check_gguf_architecture

    if not model.gguf_file:
        raise ConfigError("model.gguf_file must be set when model.source=gguf")
    if model.gguf_package:
        if not re.fullmatch(r"[0-9a-f]{64}", model.gguf_sha256):
            raise ConfigError(
                "model.gguf_sha256 must be the 64-hex sha256 of the GGUF file when "
                "model.gguf_package is set (a packaged file is always checked)"
            )
        if "==" not in model.gguf_package:
            raise ConfigError(
                f"model.gguf_package '{model.gguf_package}' is not pinned: write name==version"
            )
        return
    path = Path(model.gguf_file).expanduser().resolve()
    try:
        architecture = check_gguf_architecture(path)
    except GgufError as error:
        raise ConfigError(f"model.gguf_file: {error}") from error
    model.gguf_file = str(path)
    if model.architecture and model.architecture != architecture:
        raise ConfigError(
            f"model.architecture is {model.architecture}, but {path.name} holds a {architecture}"
        )
    model.architecture = architecture


def _validate_architecture(model: DictConfig) -> None:
    """Fill in the architecture where the config can know it before anything is fetched."""
    from llm_packager.models.onnx_build import hf_architecture

    known = None
    if model.source == ModelSource.synthetic:
        known = SYNTHETIC_ARCHITECTURE
    elif model.source == ModelSource.local:
        known = hf_architecture(Path(model.local_dir)) or None
    if known is None:
        return
    if model.architecture and model.architecture != known:
        raise ConfigError(f"model.architecture is {model.architecture}, but the model is {known}")
    model.architecture = known


def _validate_evaluate(evaluate: DictConfig, candidates: list[str]) -> None:
    from llm_packager.evaluation.scoring import EvalSetError, resolve_eval_set

    for key in ("max_tokens", "batch_size"):
        if evaluate[key] < 1:
            raise ConfigError(f"evaluate.{key} must be at least 1")
    for key in ("limit", "ttft_requests"):
        if evaluate[key] < 0:
            raise ConfigError(f"evaluate.{key} must be 0 or more")
    if evaluate.worker_timeout_s < 1:
        raise ConfigError("evaluate.worker_timeout_s must be at least 1")
    for metric in evaluate.gate:
        if metric not in MODEL_METRICS:
            raise ConfigError(
                f"evaluate.gate.{metric}: unknown metric; known: {', '.join(MODEL_METRICS)}"
            )
    if evaluate.reference not in candidates:
        raise ConfigError(
            f"evaluate.reference: '{evaluate.reference}' is not a candidate; the candidates are "
            f"{', '.join(candidates)}"
        )
    try:
        resolve_eval_set(evaluate.dataset)
    except EvalSetError as error:
        raise ConfigError(f"evaluate.dataset: {error}") from error


def config_as_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML, as logged on main's run."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig) -> str:
    """A sha256 of the resolved configuration, independent of key order."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return hashlib.sha256(json.dumps(container, sort_keys=True).encode()).hexdigest()

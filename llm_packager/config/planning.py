"""How each step's runs are planned from the composed config, and what each one holds in memory.

The step and runtime declarations (``llm_packager.config.specs``) name these functions, so `main`
asks a step's declaration how many runs it makes and with what values, and how much memory each
needs, instead of branching on its name. A step that needs nothing special plans one run from its
conf/ section and loads no model (`plan_one_run`, `loads_nothing`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm_packager.choices import ExecutionProvider, ModelSource, ModelStore, OnnxSource, TorchDtype
from llm_packager.config.parameters import config_values
from llm_packager.errors import UserError
from llm_packager.models.memory_parts import (
    AGREEMENT,
    BUILDER,
    LOG_TRANSFORMERS,
    ONNX_MODEL,
    StepMemory,
)

if TYPE_CHECKING:
    from llm_packager.config.specs import StepDefinition

_VARIANT_NAME = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(UserError, ValueError):
    """The composed configuration is invalid; the message is one line naming the key."""


@dataclass(frozen=True)
class PlannedStep:
    """One step run the config asks for: its name (the entry point, or ``log_onnx:<variant>``
    for an ONNX variant), its parameter values, upstream run ids aside, and whether an earlier
    run may stand in for it (not when its inputs can change under the same parameters)."""

    name: str
    definition: StepDefinition
    values: dict[str, Any]
    reusable: bool = True


# The signature of a step's `plan`: the step, the composed config, and where the log steps put
# their models.
Plan = Callable[["StepDefinition", DictConfig, ModelStore], list[PlannedStep]]
# The signature of a step's `memory`: its parameter values and transformers.dtype.
Memory = Callable[[Any, TorchDtype], StepMemory]


def plan_one_run(step: StepDefinition, cfg: DictConfig, store: ModelStore) -> list[PlannedStep]:
    """One run, with the values of the step's conf/ section."""
    return [PlannedStep(step.entry_point, step, config_values(step.parameters, cfg[step.section]))]


def plan_fetch(step: StepDefinition, cfg: DictConfig, store: ModelStore) -> list[PlannedStep]:
    """One fetch_model run, with the digest of files on disk, and not reusable when its Hub
    revision is a branch or tag."""
    from llm_packager.sources.content_hash import content_digest
    from llm_packager.sources.hub import is_commit

    values = config_values(step.parameters, cfg[step.section])
    source = values["source"]
    values["content_sha256"] = ""
    if source == ModelSource.local:
        values["content_sha256"] = content_digest(Path(values["local_dir"]))
    elif source == ModelSource.gguf and not values["gguf_package"]:
        values["content_sha256"] = content_digest(Path(values["gguf_file"]))
    # A branch or tag can move to another commit while the parameters stay the same.
    pinned = source != ModelSource.hub or is_commit(values["revision"])
    return [PlannedStep(step.entry_point, step, values, reusable=pinned)]


def plan_evaluate(step: StepDefinition, cfg: DictConfig, store: ModelStore) -> list[PlannedStep]:
    """One evaluate run, with the evaluation set's content hash."""
    from llm_packager.evaluation.scoring import file_sha256, resolve_eval_set

    values = config_values(step.parameters, cfg[step.section])
    # The content hash is a parameter, so editing the evaluation set invalidates earlier
    # evaluations (and the step checks the file it reads is the one hashed here).
    values["dataset_sha256"] = file_sha256(resolve_eval_set(values["dataset"]))
    return [PlannedStep(step.entry_point, step, values)]


def plan_candidates(runtime: str, candidates: Callable[[DictConfig], Mapping[str, Any]],
                    step: StepDefinition, cfg: DictConfig,
                    store: ModelStore) -> list[PlannedStep]:  # fmt: skip
    """A runtime's log step: one run per candidate of that runtime, named by the entry point
    (the candidate named as the runtime) or ``<entry point>:<variant>`` (``<runtime>-<variant>``).
    """
    return [
        PlannedStep(
            step.entry_point if name == runtime
            else f"{step.entry_point}:{name.removeprefix(runtime + '-')}",
            step,
            {**config_values(step.parameters, section), "candidate": name, "model_store": store},
        )
        for name, section in candidates(cfg).items()
    ]  # fmt: skip


def transformers_candidates(cfg: DictConfig) -> dict[str, DictConfig]:
    """The one transformers candidate: the transformers section."""
    return {"transformers": cfg.transformers}


def onnx_candidates(cfg: DictConfig) -> dict[str, DictConfig]:
    """Every ONNX candidate's settings: the onnx section itself (``onnx``) and each of
    ``onnx.variants`` merged onto it (``onnx-<variant>``), typed by the onnx schema.

    Raises:
        ConfigError: a variant name or key the schema refuses, naming it.
    """
    # Imported here: the schema is built from the step declarations, which name this function.
    from llm_packager.config.schema import SECTION_SCHEMAS

    base = OmegaConf.masked_copy(cfg.onnx, [key for key in cfg.onnx if key != "variants"])
    candidates = {"onnx": base}
    schema = OmegaConf.structured(SECTION_SCHEMAS["onnx"])
    for variant, changes in cfg.onnx.variants.items():
        if not _VARIANT_NAME.fullmatch(str(variant)):
            raise ConfigError(
                f"onnx.variants.{variant}: a variant name may hold only letters, digits, '_' "
                "and '-'"
            )
        if not isinstance(changes, DictConfig) or "variants" in changes:
            raise ConfigError(
                f"onnx.variants.{variant} must be a mapping of onnx keys to change, e.g. "
                "{precision: int8}"
            )
        try:
            merged = OmegaConf.merge(schema, base, changes)
        except OmegaConfBaseException as error:
            key = getattr(error, "full_key", "?")
            raise ConfigError(
                f"Invalid config at 'onnx.variants.{variant}.{key}': {str(error).splitlines()[0]}"
            ) from error
        candidates[f"onnx-{variant}"] = OmegaConf.masked_copy(
            merged, [key for key in merged if key != "variants"]
        )
    return candidates


def loads_nothing(values: Any, transformers_dtype: TorchDtype) -> StepMemory:
    """No model: fetch_model downloads or copies files in chunks (a GGUF or synthetic model is
    small enough to convert anywhere the pipeline runs)."""
    return StepMemory(())


def log_transformers_memory(values: Any, transformers_dtype: TorchDtype) -> StepMemory:
    """Logging the transformers model, then loading it back, in its own dtype."""
    return StepMemory((LOG_TRANSFORMERS,), transformers_dtype=values.dtype)


def log_onnx_memory(values: Any, transformers_dtype: TorchDtype) -> StepMemory:
    """The builder (source build), then the agreement check with transformers, or the ONNX model
    answering its check when there is no agreement check."""
    checks = values.agreement_tokens > 0 and values.execution_provider == ExecutionProvider.cpu
    parts = (BUILDER,) if values.source == OnnxSource.build else ()
    parts += (AGREEMENT,) if checks else (ONNX_MODEL,)
    return StepMemory(parts, agreement_dtype=values.agreement_dtype)

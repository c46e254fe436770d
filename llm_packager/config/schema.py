"""The typed schema of conf/, built from the step parameter specs.

Each pipeline step's conf/ section (``model``, ``transformers``, ``onnx``, ``evaluate``,
``register``) has one key per ``config`` field of the step's spec, with the spec's type and
default. The schema is stored in Hydra's ConfigStore as ``pipeline_schema``, which
``conf/config.yaml`` composes first: every key exists with its default before the YAML files and
the overrides are merged onto it, so an unknown key, a wrong type or an unknown choice fails at
composition, and a YAML file only states what it changes.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from llm_packager.choices import LoggedModels
from llm_packager.config.parameters import config_schema_fields
from llm_packager.config.specs import PIPELINE

SCHEMA_NAME = "pipeline_schema"
# Keys that shape the pipeline rather than a step's parameters: main reads them itself.
# onnx.variants: extra ONNX candidates, each named, each a partial onnx section merged onto the
# onnx section (e.g. {int8: {precision: int8}}); each one is a log_onnx run of its own.
PIPELINE_KEYS: dict[str, list[tuple[str, Any, dataclasses.Field]]] = {
    "onnx": [("variants", dict[str, Any], dataclasses.field(default_factory=dict))],
}


@dataclasses.dataclass
class TrackingConfig:
    """How the pipeline uses the tracking server (read by main, not a step's parameters)."""

    # auto asks the server once whether it has MLflow 3's LoggedModel API (Azure ML's has not);
    # off logs models as run artifacts (llm_packager.model_store).
    logged_models: LoggedModels = LoggedModels.auto
    # How long a tracking server that stopped answering may keep `mlflow run` waiting, counted
    # from the first call that finds it gone, retries included, before main, its steps and the
    # outer `mlflow run` give up and say so (llm_packager.errors; the outer process needs the
    # README's exports).
    server_timeout_s: int = 300


@dataclasses.dataclass
class MemoryConfig:
    """What main checks before a step loads a model (llm_packager.pipeline.memory_budget)."""

    # Refuse a step whose estimated peak memory exceeds what is available, before it starts.
    refuse_if_short: bool = True
    # MiB to take as available instead of measuring (0: measure): for a limit the measurement
    # cannot see, and for tests.
    available_mib: int = 0


# Sections main reads itself, beside the steps' sections.
PIPELINE_SECTIONS: dict[str, type] = {"tracking": TrackingConfig, "memory": MemoryConfig}


def _section_schema(section: str, spec: type, *, open_mappings: bool = False) -> type:
    fields = config_schema_fields(spec) + PIPELINE_KEYS.get(section, [])
    if open_mappings:
        fields = [
            (name, dict[str, Any] if typing.get_origin(kind) is dict else kind, default)
            for name, kind, default in fields
        ]
    return dataclasses.make_dataclass(f"{section.capitalize()}Config", fields)


def _pipeline_schema(*, open_mappings: bool = False) -> tuple[dict[str, type], type]:
    sections = {
        step.section: _section_schema(step.section, step.parameters, open_mappings=open_mappings)
        for step in PIPELINE
    } | PIPELINE_SECTIONS
    pipeline = dataclasses.make_dataclass(
        "PipelineConfig",
        [(name, schema, dataclasses.field(default_factory=schema))
         for name, schema in sections.items()],
    )  # fmt: skip
    return sections, pipeline


# The typed schema every composed config is merged onto (llm_packager.config).
SECTION_SCHEMAS, PipelineConfig = _pipeline_schema()


def _composition_schema():
    # What Hydra composes onto: the same keys and defaults, but Hydra composes in struct mode and
    # assigns an override's value where OmegaConf would merge it, so a typed mapping refuses a
    # new key (a builder option onnx.extra_options.algo_config=..., a gate metric, a variant
    # name). Mapping keys are free by design: here they are open and untyped, and the merge onto
    # the typed schema after composition checks their values.
    sections, pipeline = _pipeline_schema(open_mappings=True)
    node = OmegaConf.structured(pipeline)
    for section, schema in sections.items():
        for field in dataclasses.fields(schema):
            if typing.get_origin(field.type) is dict:
                OmegaConf.set_struct(node[section][field.name], False)
    return node


ConfigStore.instance().store(name=SCHEMA_NAME, node=_composition_schema())

"""The rules each runtime's conf/ sections must follow that the typed schema cannot express.

A runtime's declaration (``llm_packager.config.specs``) names its check, and `validate_config`
(``llm_packager.config.compose``) runs every runtime's in run order, so a new runtime brings its
own rules without an edit there. Each check names the key at fault in one line.
"""

from __future__ import annotations

from omegaconf import DictConfig

from llm_packager.choices import ModelSource, OnnxSource
from llm_packager.config.planning import ConfigError, onnx_candidates
from llm_packager.sources.hub import UnpinnedRevisionError, require_pinned_revision


def checks_nothing(cfg: DictConfig) -> None:
    """A runtime whose sections the schema checks completely."""


def check_transformers(cfg: DictConfig) -> None:
    """The transformers section: generation settings, and a reference only to a Hub model."""
    _validate_generation(cfg.transformers, "transformers")
    if not cfg.transformers.save_pretrained and cfg.model.source != ModelSource.hub:
        raise ConfigError(
            "transformers.save_pretrained=false logs a Hub model by reference and needs "
            f"model.source=hub (model.source is {cfg.model.source.value})"
        )


def check_onnx(cfg: DictConfig) -> None:
    """Every ONNX candidate: its limits, a pinned published build, an architecture the builder
    can build."""
    for name, section in onnx_candidates(cfg).items():
        prefix = "onnx" if name == "onnx" else f"onnx.variants.{name}"
        _validate_onnx(section, prefix)
        if section.source == OnnxSource.build and cfg.model.architecture:
            _validate_buildable(cfg.model.architecture, prefix)


def _validate_buildable(architecture: str, prefix: str) -> None:
    from llm_packager.models.onnx_build import UnsupportedArchitectureError, check_builder_supports

    try:
        check_builder_supports(architecture)
    except UnsupportedArchitectureError as error:
        raise ConfigError(
            f"{prefix}.source=build: {error}. Use an ONNX build made for this model "
            f"({prefix}.source=prebuilt with its repo_id, revision and subfolder), or leave "
            "log_onnx out of -P steps"
        ) from error


def _validate_onnx(onnx: DictConfig, prefix: str) -> None:
    _validate_generation(onnx, prefix)
    if onnx.max_tokens_cap < onnx.max_new_tokens:
        raise ConfigError(
            f"{prefix}.max_tokens_cap ({onnx.max_tokens_cap}) must be at least "
            f"{prefix}.max_new_tokens ({onnx.max_new_tokens})"
        )
    if onnx.max_batch_size < 1:
        raise ConfigError(f"{prefix}.max_batch_size must be 1 or more; got {onnx.max_batch_size}")
    if onnx.max_queued_requests < 1:
        raise ConfigError(
            f"{prefix}.max_queued_requests must be 1 or more; got {onnx.max_queued_requests}"
        )
    if onnx.batch_wait_ms < 0:
        raise ConfigError(f"{prefix}.batch_wait_ms must be 0 or more; got {onnx.batch_wait_ms}")
    if onnx.intra_op_num_threads < 0:
        raise ConfigError(
            f"{prefix}.intra_op_num_threads must be 0 (every usable core) or more; "
            f"got {onnx.intra_op_num_threads}"
        )
    if onnx.agreement_tokens < 0:
        raise ConfigError(f"{prefix}.agreement_tokens must be 0 (skip) or more")
    if onnx.source == OnnxSource.prebuilt:
        if not onnx.repo_id or not onnx.subfolder:
            raise ConfigError(
                f"{prefix}.repo_id and {prefix}.subfolder must be set when {prefix}.source=prebuilt"
            )
        try:
            require_pinned_revision(onnx.repo_id, onnx.revision, allow_unpinned=False)
        except UnpinnedRevisionError as error:
            raise ConfigError(f"{prefix}.revision: {error}") from error


def _validate_generation(section: DictConfig, prefix: str) -> None:
    if section.max_new_tokens < 1:
        raise ConfigError(f"{prefix}.max_new_tokens must be at least 1")
    if section.temperature <= 0:
        raise ConfigError(f"{prefix}.temperature must be greater than 0")
    if not 0 < section.top_p <= 1:
        raise ConfigError(f"{prefix}.top_p must be in (0, 1]")

"""Every closed set of choices the pipeline accepts, defined once.

The config schema, the step parameters, the command-line parsers and the library code all use
these enumerations, so a new choice is added here and nowhere else.
"""

from __future__ import annotations

from enum import Enum


class ModelSource(Enum):
    """Where fetch_model gets the model folder."""

    hub = "hub"
    local = "local"
    gguf = "gguf"
    synthetic = "synthetic"


class OnnxSource(Enum):
    """Where log_onnx gets the ONNX model."""

    prebuilt = "prebuilt"
    build = "build"


class OnnxPrecision(Enum):
    """Weight precision of an ONNX build."""

    int4 = "int4"
    int8 = "int8"
    fp16 = "fp16"
    fp32 = "fp32"


class ExecutionProvider(Enum):
    """The onnxruntime execution provider an ONNX model is built for."""

    cpu = "cpu"
    cuda = "cuda"


class GgufBlocks(Enum):
    """What an int4 ONNX build does with a GGUF source's quantized blocks. ``auto``: carries
    Q4_0, Q4_1 and Q8_0 blocks over as they are, so the model computes the file's own weights,
    its 4-bit matmuls on float activations (other formats are re-quantized, and the run's tag
    says why); ``fast``: the same blocks, every matmul on int8 activations (onnxruntime's
    accuracy level 4: faster, a little further from the file's model); ``requantize``: the
    model builder quantizes the weights dequantized from them again."""

    auto = "auto"
    fast = "fast"
    requantize = "requantize"


class ServingBatching(Enum):
    """How the served ONNX model decodes concurrent requests. ``auto``: one batch that sequences
    join and leave at every step, where the build allows it (CPU builds of the builder's decoder);
    otherwise, and with ``generators``, onnxruntime-genai Generators, whose batches cannot grow."""

    auto = "auto"
    generators = "generators"


class Device(Enum):
    """Where torch runs the transformers model."""

    cpu = "cpu"
    cuda = "cuda"


class TorchDtype(Enum):
    """The dtype the transformers model loads with; ``auto`` keeps the stored one."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class LoggedModels(Enum):
    """Whether to log models as MLflow 3 LoggedModels: ``auto`` asks the tracking server once."""

    auto = "auto"
    on = "on"
    off = "off"


class ModelStore(Enum):
    """Where a log step puts its model: a LoggedModel (``models:/<id>``), or the run's artifacts
    (``runs:/<run id>/chat_model``) for tracking servers without the LoggedModel API."""

    logged_models = "logged_models"
    run_artifacts = "run_artifacts"


class GateDirection(Enum):
    """Whether a gate metric must stay above (higher) or below (lower) its threshold."""

    higher = "higher"
    lower = "lower"


class RecommendationPolicy(Enum):
    """How evaluate picks the candidate to ship among those that passed the gate."""

    fastest_passed = "fastest_passed"
    best_quality_passed = "best_quality_passed"
    smallest_passed = "smallest_passed"


class EvaluationEngine(Enum):
    """Where evaluate answers its set: ``local``, one worker process per candidate on this
    machine; ``spark``, partitioned across a Spark session's executors (docs/spark.md)."""

    local = "local"
    spark = "spark"


def choice_names(enumeration: type[Enum]) -> str:
    """``a, b or c``: the values of an enumeration, for messages and help texts."""
    values = [member.value for member in enumeration]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"

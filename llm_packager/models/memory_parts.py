"""What a step's processes hold in memory at their peak, as measured parts of the model's weights.

A step's peak is a fixed part (Python, torch, onnxruntime, MLflow) plus some copies of the model's
weights. Both were measured by ``benchmarks/memory.py``: the whole pipeline on synthetic Phi-3
models of Phi-3-mini's width with 1, 2 and 4 layers, whose parameter counts are linear in the
layers, so a least-squares line per part gives its copies of the weights (the slope) and its
fixed part (the intercept). Parts that load the Hugging Face weights scale with the dtype they
load in; the ONNX parts scale with the parameter count alone (their precision is the build's).
Each step's and each runtime's declaration (``llm_packager.config.specs``) names its parts; the
check before a step is launched is ``llm_packager.pipeline.memory_budget``. See docs/performance.md,
"Memory and disk each step needs for Phi-3-mini".
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_packager.choices import TorchDtype

MIB = 2**20
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class MemoryPart:
    """What one process of a step holds at its peak: ``fixed_mib``, plus ``loaded_copies`` of the
    weights in the dtype it loads them in (``loads_weights_as``), plus ``float32_copies`` of the
    weights at 4 bytes per parameter whatever their dtype (the ONNX model, whose size follows
    the parameter count; the builder's float32 working tensors)."""

    what: str
    fixed_mib: float
    loaded_copies: float
    float32_copies: float
    # "stored": the Hugging Face weights in the dtype they are stored in; "transformers": in
    # transformers.dtype (auto: as stored); "agreement": in onnx.agreement_dtype.
    loads_weights_as: str
    fix: str


# Measured by benchmarks/memory.py on this machine (2 cores, 24 GiB), with the weights stored in
# float32 and in bfloat16 (benchmarks/results/memory-float32.json and memory-bfloat16.json): the
# per-layer slopes of the two runs give the copies (for the builder, 1,042 and 751 MiB per layer
# solve to 1.35 copies as stored plus 1.06 in float32), and the larger of the two intercepts the
# fixed part. Rerun it and update these after changing what a step loads.
LOG_TRANSFORMERS = MemoryPart(
    what="logging the transformers model and loading it back",
    fixed_mib=570,
    loaded_copies=1.00,
    float32_copies=0,
    loads_weights_as="transformers",
    fix="transformers.dtype=bfloat16",
)
BUILDER = MemoryPart(
    what="the onnxruntime-genai model builder",
    fixed_mib=970,
    loaded_copies=1.35,
    float32_copies=1.06,
    loads_weights_as="stored",
    fix="onnx=prebuilt (Microsoft's published int4 build, Phi-3 only)",
)
AGREEMENT = MemoryPart(
    what="the agreement check with transformers",
    fixed_mib=399,
    loaded_copies=1.00,
    float32_copies=0,
    loads_weights_as="agreement",
    fix="onnx.agreement_tokens=0 (skips the agreement check)",
)
ONNX_MODEL = MemoryPart(
    what="the ONNX model loaded and answering",
    fixed_mib=237,
    loaded_copies=0,
    float32_copies=0.22,
    loads_weights_as="",
    fix="a smaller onnx.precision",
)
TRANSFORMERS_MODEL = MemoryPart(
    what="the transformers model loaded and answering",
    fixed_mib=413,
    loaded_copies=1.00,
    float32_copies=0,
    loads_weights_as="transformers",
    fix="transformers.dtype=bfloat16",
)


def _dtype_bytes(dtype: TorchDtype, stored_bytes: int) -> int:
    return stored_bytes if dtype == TorchDtype.auto else (4 if dtype == TorchDtype.float32 else 2)


def stored_bytes_per_parameter(total_bytes: float, parameter_count: float) -> int:
    """2 or 4: the fetched folder's size per parameter (the weights are nearly all of it)."""
    return 2 if total_bytes / max(parameter_count, 1) < 3 else 4


@dataclass(frozen=True)
class StepMemory:
    """What a step run will load: the parts that apply to it and the dtypes they load in."""

    parts: tuple[MemoryPart, ...]
    transformers_dtype: TorchDtype = TorchDtype.auto
    agreement_dtype: TorchDtype = TorchDtype.auto

    def need_mib(self, part: MemoryPart, parameter_count: int, stored_bytes: int) -> float:
        loads_as = {"transformers": self.transformers_dtype, "agreement": self.agreement_dtype,
                    "stored": TorchDtype.auto}  # fmt: skip
        dtype = loads_as.get(part.loads_weights_as, TorchDtype.float32)
        loaded_bytes = _dtype_bytes(dtype, stored_bytes)
        per_parameter = part.loaded_copies * loaded_bytes + part.float32_copies * FLOAT32_BYTES
        return part.fixed_mib + parameter_count * per_parameter / MIB

    def largest(self, parameter_count: int, stored_bytes: int) -> tuple[MemoryPart, float] | None:
        """The part with the largest need and that need (MiB); None when nothing is loaded."""
        needs = [(part, self.need_mib(part, parameter_count, stored_bytes)) for part in self.parts]
        return max(needs, key=lambda pair: pair[1], default=None)

"""The memory check main makes before each step: what a step loads, in which dtype, and the one
line a machine too small for it gets (the end-to-end refusal is in test_pipeline_server.py)."""

from __future__ import annotations

import pytest

from llm_packager.config.compose import compose_config
from llm_packager.models.memory_parts import (
    AGREEMENT,
    BUILDER,
    MIB,
    ONNX_MODEL,
    TRANSFORMERS_MODEL,
    stored_bytes_per_parameter,
)
from llm_packager.pipeline.driver import plan_pipeline
from llm_packager.pipeline.memory_budget import (
    NotEnoughMemoryError,
    available_memory_mib,
    check_memory,
    step_memory,
)

PHI3_MINI_PARAMETERS = 3_821_079_552
BFLOAT16 = 2


def _memory(model: str, overrides: str, step: str):
    cfg = compose_config(model, overrides)
    planned = next(p for p in plan_pipeline(cfg) if p.name == step)
    upstream = {"fetch_model_run_id": "unused"} if step.startswith("log_") else {}
    values = planned.definition.parameters(**planned.values, **upstream) if upstream else None
    return step_memory(planned.definition.entry_point, values, cfg.transformers.dtype)


def test_each_measured_part_grows_with_the_weights():
    for part in (AGREEMENT, BUILDER, ONNX_MODEL, TRANSFORMERS_MODEL):
        assert part.fixed_mib > 0 and part.loaded_copies + part.float32_copies > 0, part


def test_the_stored_dtype_is_read_from_the_folder_size():
    assert stored_bytes_per_parameter(7.64e9, PHI3_MINI_PARAMETERS) == 2  # Phi-3-mini, bfloat16
    assert stored_bytes_per_parameter(538e6, 134.5e6) == 4  # SmolLM2 from GGUF, float32


def test_the_parts_a_step_loads_follow_its_parameters():
    default = _memory("phi3-mini-4k-instruct", "", "log_onnx")
    assert default.parts == (AGREEMENT,)  # prebuilt: no builder
    built = _memory("phi3-mini-4k-instruct", "onnx=build", "log_onnx")
    assert built.parts == (BUILDER, AGREEMENT)
    unchecked = _memory("phi3-mini-4k-instruct", "onnx.agreement_tokens=0", "log_onnx")
    assert unchecked.parts == (ONNX_MODEL,)
    assert _memory("phi3-mini-4k-instruct", "", "evaluate").parts == (
        TRANSFORMERS_MODEL,
        ONNX_MODEL,
    )


def test_the_agreement_check_in_float32_needs_the_bfloat16_weights_again():
    stored = _memory("phi3-mini-4k-instruct", "", "log_onnx")
    float32 = _memory("phi3-mini-4k-instruct", "onnx.agreement_dtype=float32", "log_onnx")
    as_stored = stored.need_mib(AGREEMENT, PHI3_MINI_PARAMETERS, BFLOAT16)
    in_float32 = float32.need_mib(AGREEMENT, PHI3_MINI_PARAMETERS, BFLOAT16)
    bfloat16_weights_mib = PHI3_MINI_PARAMETERS * BFLOAT16 / MIB
    assert in_float32 - as_stored == pytest.approx(AGREEMENT.loaded_copies * bfloat16_weights_mib)


def test_a_step_that_will_not_fit_is_refused_in_one_line_with_the_fix():
    memory = _memory("phi3-mini-4k-instruct", "", "log_onnx")
    _, need = memory.largest(PHI3_MINI_PARAMETERS, BFLOAT16)
    check_memory("log_onnx", memory, PHI3_MINI_PARAMETERS, BFLOAT16, available_mib=need + 1)
    with pytest.raises(NotEnoughMemoryError) as refused:
        check_memory("log_onnx", memory, PHI3_MINI_PARAMETERS, BFLOAT16, available_mib=need - 1)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"log_onnx would need about {need / 1024:.1f} GiB for the agreement check with "
        "transformers of a 3.82 B-parameter model"
    )
    assert f"but {(need - 1) / 1024:.1f} GiB is available" in message
    assert "Cheapest fix: onnx.agreement_tokens=0" in message
    assert "memory.refuse_if_short=false" in message


def test_fetch_loads_nothing_the_check_estimates():
    assert _memory("tiny-random-phi3", "", "fetch_model").parts == ()


def test_available_memory_is_measured_unless_a_figure_is_given():
    assert available_memory_mib(1234) == 1234
    assert 0 < available_memory_mib() < float("inf")


def test_the_estimates_cover_what_was_measured_at_phi3_minis_width():
    # benchmarks/memory.py at 4 layers (650.5 M parameters): the builder's peak with the weights
    # stored in float32 and in bfloat16, and the agreement check's in bfloat16. An estimate may
    # be a little high (it takes the larger fixed part of the two runs), never low.
    parameters = 197_004_288 + 4 * 113_252_352
    built = _memory("phi3-mini-4k-instruct", "onnx=build", "log_onnx")
    for part, stored_bytes, measured in ((BUILDER, 4, 6_739), (BUILDER, 2, 5_288),
                                         (AGREEMENT, 2, 1_642)):  # fmt: skip
        estimate = built.need_mib(part, parameters, stored_bytes)
        assert measured * 0.99 <= estimate <= measured * 1.05, (part.what, stored_bytes, estimate)

"""The CUDA choices: selected by config alone, with the right builder arguments and packages, and
refused with the fix on a machine without a GPU (this one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_packager.config import (
    compose_config,
    log_onnx_parameters,
    log_transformers_parameters,
)
from llm_packager.onnx_build import (
    RUNTIME_DISTRIBUTIONS,
    build_onnx_model,
    builder_command,
    parse_extra_options,
)
from steps.log_onnx import LogOnnxRequest, log_onnx
from steps.log_transformers import LogTransformersRequest, log_transformers


def test_cpu_stays_the_default():
    cfg = compose_config("tiny-random-phi3", "")
    assert log_onnx_parameters(cfg)["execution_provider"] == "cpu"
    assert log_transformers_parameters(cfg)["device"] == "cpu"
    assert log_transformers_parameters(cfg)["dtype"] == "auto"


def test_cuda_build_config_gives_cuda_builder_arguments():
    parameters = log_onnx_parameters(compose_config("tiny-random-phi3", "onnx=build-cuda"))
    assert (parameters["source"], parameters["precision"]) == ("build", "int4")
    command = builder_command(
        Path("hf"), Path("out"), parameters["precision"], parameters["execution_provider"],
        parse_extra_options(parameters["extra_options"]), Path("cache"),
    )  # fmt: skip
    assert command[command.index("-e") + 1] == "cuda"
    assert command[command.index("-p") + 1] == "int4"
    assert "block_size=32" in command[command.index("--extra_options") + 1 :]


def test_cuda_fp16_is_one_override_away():
    parameters = log_onnx_parameters(
        compose_config("tiny-random-phi3", "onnx=build-cuda onnx.precision=fp16")
    )
    assert (parameters["precision"], parameters["execution_provider"]) == ("fp16", "cuda")


def test_prebuilt_cuda_config_fetches_microsofts_cuda_folder():
    parameters = log_onnx_parameters(compose_config("phi3-mini-4k-instruct", "onnx=prebuilt-cuda"))
    assert parameters["subfolder"] == "cuda/cuda-int4-rtn-block-32"
    assert parameters["allow_patterns"] == "cuda/cuda-int4-rtn-block-32/*"
    assert parameters["execution_provider"] == "cuda"
    assert parameters["revision"] == "5f5f794c1c23c9d5ee142af85df02a6cc52d6945"


def test_cuda_transformers_config_loads_on_the_gpu_in_half_precision():
    parameters = log_transformers_parameters(
        compose_config("phi3-mini-4k-instruct", "transformers=cuda")
    )
    assert (parameters["device"], parameters["dtype"]) == ("cuda", "float16")


def test_a_cuda_model_requires_the_cuda_runtime_packages():
    assert RUNTIME_DISTRIBUTIONS["cuda"] == ("onnxruntime-genai-cuda", "onnxruntime-gpu")
    assert RUNTIME_DISTRIBUTIONS["cpu"] == ("onnxruntime-genai", "onnxruntime")
    cuda_pins = {
        line.split("==")[0]
        for line in Path("requirements-cuda.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert set(RUNTIME_DISTRIBUTIONS["cuda"]) <= cuda_pins


def test_cuda_onnx_without_a_gpu_is_refused_before_any_work(local_tracking):
    with pytest.raises(ValueError) as refused:
        log_onnx(LogOnnxRequest("unused-run", execution_provider="cuda"), run_id="unused")
    assert "onnx.execution_provider=cuda needs a GPU and onnxruntime-genai-cuda" in str(
        refused.value
    )


def test_cuda_transformers_without_a_gpu_is_refused_before_any_work(local_tracking):
    with pytest.raises(ValueError) as refused:
        log_transformers(
            LogTransformersRequest("unused-run", device="cuda", dtype="float16"), run_id="unused"
        )
    assert "transformers.device=cuda, but torch sees no CUDA GPU here" in str(refused.value)


def test_the_builder_makes_a_cuda_model_here_without_a_gpu(tiny_model_dir, tmp_path):
    # Building needs no GPU (only running does), so the CUDA build path is exercised for real.
    parameters = log_onnx_parameters(compose_config("tiny-random-phi3", "onnx=build-cuda"))
    folder = build_onnx_model(
        tiny_model_dir, tmp_path / "onnx-cuda", precision=parameters["precision"],
        execution_provider=parameters["execution_provider"],
        extra_options=parse_extra_options(parameters["extra_options"]),
        log_path=tmp_path / "builder.log",
    )  # fmt: skip
    genai_config = json.loads((folder / "genai_config.json").read_text())
    providers = genai_config["model"]["decoder"]["session_options"]["provider_options"]
    assert [next(iter(provider)) for provider in providers] == ["cuda"]
    assert (folder / "model.onnx").stat().st_size > 0

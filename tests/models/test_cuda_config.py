"""The CUDA choices: selected by config alone, with the right builder arguments and packages, and
refused with the fix on a machine without a GPU (this one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_packager.choices import Device, ExecutionProvider, OnnxPrecision, TorchDtype
from llm_packager.config.compose import compose_config
from llm_packager.config.parameters import config_values
from llm_packager.config.specs import LogOnnxParameters, LogTransformersParameters
from llm_packager.models.onnx_build import RUNTIME_DISTRIBUTIONS, build_onnx_model, builder_command
from llm_packager.project import PROJECT_DIR
from steps.log_onnx import log_onnx
from steps.log_transformers import log_transformers


def _onnx(model: str, overrides: str) -> dict:
    return config_values(LogOnnxParameters, compose_config(model, overrides).onnx)


def _transformers(model: str, overrides: str) -> dict:
    return config_values(LogTransformersParameters, compose_config(model, overrides).transformers)


def test_cpu_stays_the_default():
    assert _onnx("tiny-random-phi3", "")["execution_provider"] == ExecutionProvider.cpu
    assert _transformers("tiny-random-phi3", "")["device"] == Device.cpu
    assert _transformers("tiny-random-phi3", "")["dtype"] == TorchDtype.auto


def test_cuda_build_config_gives_cuda_builder_arguments():
    parameters = _onnx("tiny-random-phi3", "onnx=build-cuda")
    assert (parameters["source"].value, parameters["precision"]) == ("build", OnnxPrecision.int4)
    command = builder_command(
        Path("hf"), Path("out"), parameters["precision"], parameters["execution_provider"],
        parameters["extra_options"], Path("cache"),
    )  # fmt: skip
    assert command[command.index("-e") + 1] == "cuda"
    assert command[command.index("-p") + 1] == "int4"
    assert "block_size=32" in command[command.index("--extra_options") + 1 :]


def test_cuda_fp16_is_one_override_away():
    parameters = _onnx("tiny-random-phi3", "onnx=build-cuda onnx.precision=fp16")
    assert (parameters["precision"], parameters["execution_provider"]) == (
        OnnxPrecision.fp16,
        ExecutionProvider.cuda,
    )


def test_prebuilt_cuda_config_fetches_microsofts_cuda_folder():
    parameters = _onnx("phi3-mini-4k-instruct", "onnx=prebuilt-cuda")
    assert parameters["subfolder"] == "cuda/cuda-int4-rtn-block-32"
    assert parameters["allow_patterns"] == ("cuda/cuda-int4-rtn-block-32/*",)
    assert parameters["execution_provider"] == ExecutionProvider.cuda
    assert parameters["revision"] == "5f5f794c1c23c9d5ee142af85df02a6cc52d6945"


def test_cuda_transformers_config_loads_on_the_gpu_in_half_precision():
    parameters = _transformers("phi3-mini-4k-instruct", "transformers=cuda")
    assert (parameters["device"], parameters["dtype"]) == (Device.cuda, TorchDtype.float16)


def test_a_cuda_model_requires_the_cuda_runtime_packages():
    assert RUNTIME_DISTRIBUTIONS[ExecutionProvider.cuda] == (
        "onnxruntime-genai-cuda",
        "onnxruntime-gpu[cuda,cudnn]",
    )
    assert RUNTIME_DISTRIBUTIONS[ExecutionProvider.cpu] == ("onnxruntime-genai", "onnxruntime")
    cuda_pins = {
        line.split("==")[0]
        for line in (PROJECT_DIR / "requirements-cuda.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert set(RUNTIME_DISTRIBUTIONS[ExecutionProvider.cuda]) <= cuda_pins


def test_cuda_onnx_without_a_gpu_is_refused_before_any_work(local_tracking):
    with pytest.raises(ValueError) as refused:
        log_onnx(
            LogOnnxParameters(fetch_model_run_id="unused-run",
                              execution_provider=ExecutionProvider.cuda),
            run_id="unused",
        )  # fmt: skip
    assert "onnx.execution_provider=cuda needs a GPU and onnxruntime-genai-cuda" in str(
        refused.value
    )


def test_cuda_transformers_without_a_gpu_is_refused_before_any_work(local_tracking):
    with pytest.raises(ValueError) as refused:
        log_transformers(
            LogTransformersParameters(
                fetch_model_run_id="unused-run", device=Device.cuda, dtype=TorchDtype.float16
            ),
            run_id="unused",
        )
    assert "transformers.device=cuda, but torch sees no CUDA GPU here" in str(refused.value)


@pytest.mark.slow
def test_the_builder_makes_a_cuda_model_here_without_a_gpu(tiny_model_dir, tmp_path):
    # Building needs no GPU (only running does), so the CUDA build path is exercised for real.
    parameters = _onnx("tiny-random-phi3", "onnx=build-cuda")
    folder = build_onnx_model(
        tiny_model_dir, tmp_path / "onnx-cuda", precision=parameters["precision"],
        execution_provider=parameters["execution_provider"],
        extra_options=parameters["extra_options"],
        log_path=tmp_path / "builder.log",
    )  # fmt: skip
    genai_config = json.loads((folder / "genai_config.json").read_text())
    providers = genai_config["model"]["decoder"]["session_options"]["provider_options"]
    assert [next(iter(provider)) for provider in providers] == ["cuda"]
    assert (folder / "model.onnx").stat().st_size > 0

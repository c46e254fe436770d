"""Building ONNX models with the onnxruntime-genai model builder, and their MLflow signature."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from llm_packager.choices import ExecutionProvider, OnnxPrecision
from llm_packager.errors import UserError

# The pip distributions that run a model built for each execution provider: the CUDA packages
# replace the CPU ones (they install the same Python modules). onnxruntime-gpu 1.31 is built for
# CUDA 13; its extras install the CUDA and cuDNN libraries it loads (nvidia-* wheels), so a
# served CUDA model needs only the NVIDIA driver (580 or newer) on the machine.
RUNTIME_DISTRIBUTIONS = {
    ExecutionProvider.cpu: ("onnxruntime-genai", "onnxruntime"),
    ExecutionProvider.cuda: ("onnxruntime-genai-cuda", "onnxruntime-gpu[cuda,cudnn]"),
}
PROMPT_FIELD = "prompt"
_LOG_TAIL_LINES = 30

logger = logging.getLogger(__name__)


class OnnxBuildError(UserError, RuntimeError):
    """The model builder failed; the message carries the end of its output."""


class UnsupportedArchitectureError(UserError, ValueError):
    """The onnxruntime-genai model builder cannot build this model architecture."""


@functools.cache
def builder_architectures() -> frozenset[str]:
    """The transformers architectures the installed model builder knows.

    The builder picks its model class in a chain of ``config.architectures[0] == "<name>"``
    tests and exposes no list, so the names are read from its source (without importing it,
    which loads torch and onnx).
    """
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return frozenset()
    tree = ast.parse(Path(spec.origin).read_text())
    return frozenset(
        node.comparators[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and isinstance(node.left, ast.Subscript)
        and "architectures" in ast.unparse(node.left)
        and isinstance(node.comparators[0], ast.Constant)
        and isinstance(node.comparators[0].value, str)
    )


def check_builder_supports(architecture: str) -> None:
    """Refuse an architecture the model builder cannot build, naming what it can.

    Raises:
        UnsupportedArchitectureError: naming the architecture and the builder's version.
    """
    known = builder_architectures()
    if architecture not in known:
        import importlib.metadata

        version = importlib.metadata.version("onnxruntime-genai")
        raise UnsupportedArchitectureError(
            f"the onnxruntime-genai {version} model builder cannot build {architecture}; it "
            f"builds {', '.join(sorted(known))}"
        )


class PrebuiltMismatchError(UserError, ValueError):
    """A published ONNX build was made for another model than the one fetched."""


def check_prebuilt_matches(onnx_folder: Path, hf_folder: Path) -> None:
    """Refuse an ONNX build whose genai_config.json describes another model than the fetched
    config.json: another model type, vocabulary, hidden size or number of layers.

    Raises:
        PrebuiltMismatchError: naming every field that differs.
    """
    genai = json.loads((onnx_folder / "genai_config.json").read_text())["model"]
    config = json.loads((hf_folder / "config.json").read_text())
    decoder = genai.get("decoder", {})
    pairs = {
        "model type": (genai.get("type"), config.get("model_type")),
        "vocab_size": (genai.get("vocab_size"), config.get("vocab_size")),
        "hidden_size": (decoder.get("hidden_size"), config.get("hidden_size")),
        "num_hidden_layers": (decoder.get("num_hidden_layers"), config.get("num_hidden_layers")),
    }
    if differences := [
        f"{name} {built} (ONNX) vs {fetched} (fetched)"
        for name, (built, fetched) in pairs.items()
        if built != fetched
    ]:
        raise PrebuiltMismatchError(
            f"The published ONNX build in {onnx_folder.name} is for another model: "
            f"{'; '.join(differences)}. Build one from the fetched weights with onnx=build"
        )


def hf_architecture(hf_folder: Path) -> str:
    """``architectures[0]`` of a Hugging Face folder's config.json ("" when it names none)."""
    config = json.loads((hf_folder / "config.json").read_text())
    return (config.get("architectures") or [""])[0]


def builder_command(
    hf_folder: Path,
    destination: Path,
    precision: OnnxPrecision,
    execution_provider: ExecutionProvider,
    extra_options: dict[str, str],
    cache: Path,
) -> list[str]:
    """The model builder's command line."""
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf_folder), "-o", str(destination),
        "-p", precision.value, "-e", execution_provider.value, "-c", str(cache),
    ]  # fmt: skip
    if extra_options:
        command += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    return command


def build_onnx_model(
    hf_folder: Path,
    destination: Path,
    *,
    precision: OnnxPrecision,
    execution_provider: ExecutionProvider,
    extra_options: dict[str, str],
    log_path: Path,
) -> Path:
    """Run ``python -m onnxruntime_genai.models.builder`` on a local Hugging Face folder.

    The builder's output streams to the console (it shows its own progress) and to ``log_path``.

    Raises:
        OnnxBuildError: the builder exited non-zero.
    """
    with tempfile.TemporaryDirectory(prefix="onnx-builder-cache-") as cache:
        command = builder_command(
            hf_folder, destination, precision, execution_provider, extra_options, Path(cache)
        )
        logger.info("Building ONNX: %s", " ".join(command))
        # The weights are local: the builder must not try the Hub for configs or tokens.
        environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
        tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        with log_path.open("w") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        ) as builder:  # fmt: skip
            for line in builder.stdout:
                log.write(line)
                sys.stderr.write(line)
                tail.append(line.rstrip())
        if builder.returncode != 0:
            raise OnnxBuildError(
                f"onnxruntime-genai model builder failed (exit {builder.returncode}): "
                + " | ".join(line for line in tail if line)[-2000:]
            )
    return destination


def chat_signature() -> ModelSignature:
    """The OpenAI chat signature MLflow gives ``llm/v1/chat`` models, plus an optional ``prompt``
    input for the reference sample's request shape (so ``messages`` becomes optional) and
    OpenAI's optional ``seed``."""
    from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA

    inputs = [
        ColSpec(spec.type, spec.name, required=False) if spec.name == "messages" else spec
        for spec in CHAT_MODEL_INPUT_SCHEMA.inputs
    ]
    inputs.append(ColSpec("string", PROMPT_FIELD, required=False))
    # OpenAI's `seed`: makes a sampled answer reproducible.
    inputs.append(ColSpec("long", "seed", required=False))
    return ModelSignature(inputs=Schema(inputs), outputs=CHAT_MODEL_OUTPUT_SCHEMA)

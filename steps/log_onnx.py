"""Entry point ``log_onnx``: an ONNX build of the model as a pyfunc chat model on onnxruntime-genai.

Reads (MLproject parameters):
    fetch_model_run_id: the upstream fetch_model run (its weights for ``build``, and the
        reference for the greedy agreement check).
    source: ``prebuilt`` (Microsoft's published folder: repo_id, revision, subfolder,
        allow_patterns) or ``build`` (the onnxruntime-genai model builder on the fetched weights:
        precision, execution_provider, extra_options as ``key=value,...``).
    max_new_tokens, do_sample, temperature, top_p: generation defaults of the served model.
    max_tokens_cap: the largest ``max_tokens`` a request may ask for.
    max_batch_size: rows of one request generated together as one batch.
    intra_op_num_threads: onnxruntime threads when serving (0: every usable core).
    agreement_tokens: new tokens per prompt for the agreement check (0 skips it).

Writes (on its own run):
    a LoggedModel ``chat_model`` logged from code (``llm_packager/onnx_chat_model.py``) with the
    ONNX folder as artifact ``onnx_model``; its ``models:/<id>`` URI in the tags
    ``llm_packager.outputs`` and ``llm_packager.model_uri``; params ``onnxruntime_genai_version``
    and the builder options; artifacts ``sample_completion.json``, ``sample_prompt_answer.json``
    and ``logs/onnx_builder.log``; metrics ``onnx_size_bytes``, ``load_seconds``,
    ``log_seconds`` and ``greedy_token_agreement`` (vs transformers fp32).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from llm_packager.chat import EXAMPLE_CHAT_REQUEST, check_chat_completion
from llm_packager.hub import download_pinned_snapshot
from llm_packager.manifest import check_model_files, folder_bytes
from llm_packager.onnx_build import (
    RUNTIME_DISTRIBUTIONS,
    build_onnx_model,
    chat_signature,
    parse_extra_options,
)
from llm_packager.reuse import announce_model
from llm_packager.step_run import LOG_ARTIFACT_DIR, exit_process, run_step
from llm_packager.upstream import FetchedModel, fetched_model

MODEL_CODE = Path(__file__).resolve().parent.parent / "llm_packager" / "onnx_chat_model.py"
# Must equal ONNX_ARTIFACT_KEY in the model file, which cannot import this project.
ONNX_ARTIFACT_KEY = "onnx_model"
CHECK_MAX_TOKENS = 8
# The reference sample's request, unchanged: a prompt already in Phi-3's chat format.
REFERENCE_PROMPT_REQUEST = {
    "prompt": "<|system|>You are a stand-up comedian.<|end|><|user|>Tell me a joke about atom"
    "<|end|><|assistant|>"
}
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogOnnxRequest:
    """Mirrors the entry point's parameters."""

    fetch_model_run_id: str
    source: str = "build"
    repo_id: str = ""
    revision: str = ""
    subfolder: str = ""
    allow_patterns: tuple[str, ...] = ()
    precision: str = "int4"
    execution_provider: str = "cpu"
    extra_options: str = ""
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens_cap: int = 1024
    max_batch_size: int = 8
    intra_op_num_threads: int = 0
    agreement_tokens: int = 16


@dataclass(frozen=True)
class LogOnnxResult:
    """What the step logged and measured."""

    model_uri: str
    onnx_size_bytes: int
    load_seconds: float
    greedy_token_agreement: float | None


def _onnx_folder(request: LogOnnxRequest, fetched: FetchedModel, scratch: Path) -> Path:
    if request.source == "prebuilt":
        snapshot = download_pinned_snapshot(
            request.repo_id, request.revision, list(request.allow_patterns)
        )
        mlflow.set_tags({"onnx.repo_id": request.repo_id, "onnx.resolved_commit": snapshot.commit})
        folder = snapshot.folder / request.subfolder
        check_model_files(folder)
        return folder
    if request.source == "build":
        log_path = scratch / "onnx_builder.log"
        try:
            return build_onnx_model(
                fetched.folder,
                scratch / "onnx",
                precision=request.precision,
                execution_provider=request.execution_provider,
                extra_options=parse_extra_options(request.extra_options),
                log_path=log_path,
            )
        finally:
            if log_path.exists():
                mlflow.log_artifact(str(log_path), LOG_ARTIFACT_DIR)
    raise ValueError(f"unknown ONNX source '{request.source}'; expected prebuilt or build")


def _agreement(request: LogOnnxRequest, fetched: FetchedModel, onnx_folder: Path) -> float | None:
    from llm_packager.parity import (
        chat_token_ids,
        greedy_onnx,
        greedy_transformers,
        prefix_agreement,
    )

    if request.agreement_tokens == 0 or request.execution_provider != "cpu":
        return None
    prompts = chat_token_ids(fetched.folder)
    reference = greedy_transformers(fetched.folder, prompts, request.agreement_tokens)
    return prefix_agreement(reference, greedy_onnx(onnx_folder, prompts, request.agreement_tokens))


def log_onnx(request: LogOnnxRequest, run_id: str) -> LogOnnxResult:
    """Get or build the ONNX model, log it from code, and check both request shapes."""
    import onnxruntime_genai

    from llm_packager.requirements import pinned

    if request.execution_provider == "cuda" and not onnxruntime_genai.is_cuda_available():
        raise ValueError(
            "onnx.execution_provider=cuda needs a GPU and onnxruntime-genai-cuda in place of "
            f"onnxruntime-genai (installed: onnxruntime-genai {onnxruntime_genai.__version__}, no "
            "CUDA); see README, 'Run on a GPU', or use a CPU onnx choice"
        )
    fetched = fetched_model(request.fetch_model_run_id)
    mlflow.set_tags(fetched.lineage_tags())
    model_name = fetched.tags.get(
        "hf.repo_id", fetched.tags.get("llm_packager.model_name", "model")
    )
    with tempfile.TemporaryDirectory(prefix="log-onnx-") as scratch:
        onnx_folder = _onnx_folder(request, fetched, Path(scratch))
        check_model_files(onnx_folder)
        size = folder_bytes(onnx_folder)
        mlflow.log_params({"onnxruntime_genai_version": onnxruntime_genai.__version__})
        agreement = _agreement(request, fetched, onnx_folder)
        started = time.perf_counter()
        model_info = mlflow.pyfunc.log_model(
            name="chat_model",
            python_model=str(MODEL_CODE),
            artifacts={ONNX_ARTIFACT_KEY: str(onnx_folder)},
            model_config={
                "model_name": f"{model_name} ({request.precision} onnx)",
                "max_new_tokens": request.max_new_tokens,
                "do_sample": request.do_sample,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "max_tokens_cap": request.max_tokens_cap,
                "max_batch_size": request.max_batch_size,
                "intra_op_num_threads": request.intra_op_num_threads,
            },
            signature=chat_signature(),
            input_example=EXAMPLE_CHAT_REQUEST,
            pip_requirements=pinned(
                "mlflow", *RUNTIME_DISTRIBUTIONS[request.execution_provider], "numpy", "pandas"
            ),
            metadata={"source_model": model_name, "precision": request.precision},
        )
        log_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="logged-onnx-") as scratch:
        local = mlflow.artifacts.download_artifacts(model_info.model_uri, dst_path=scratch)
        started = time.perf_counter()
        loaded = mlflow.pyfunc.load_model(local)
        load_seconds = time.perf_counter() - started
        chat_answer = loaded.predict({**EXAMPLE_CHAT_REQUEST, "max_tokens": CHECK_MAX_TOKENS})
        prompt_answer = loaded.predict({**REFERENCE_PROMPT_REQUEST, "max_tokens": CHECK_MAX_TOKENS})
    check_chat_completion(chat_answer[0], max_tokens=CHECK_MAX_TOKENS)
    if not isinstance(prompt_answer[0], str):
        raise ValueError(f"a prompt request must be answered with text, got {prompt_answer[0]!r}")
    mlflow.log_dict(chat_answer[0], "sample_completion.json")
    mlflow.log_dict(
        {**REFERENCE_PROMPT_REQUEST, "answer": prompt_answer[0]}, "sample_prompt_answer.json"
    )
    metrics = {"onnx_size_bytes": size, "load_seconds": load_seconds, "log_seconds": log_seconds}
    if agreement is not None:
        metrics["greedy_token_agreement"] = agreement
    mlflow.log_metrics(metrics)
    announce_model(mlflow.MlflowClient(), run_id, model_info.model_uri)
    logger.info(
        "Logged %s: ONNX %d bytes, loads in %.2f s, greedy agreement %s",
        model_info.model_uri, size, load_seconds, agreement,
    )  # fmt: skip
    return LogOnnxResult(model_info.model_uri, size, load_seconds, agreement)


def _parse_arguments(argv: list[str]) -> LogOnnxRequest:
    parser = argparse.ArgumentParser(description="Log an ONNX build as a pyfunc chat model.")
    parser.add_argument("--fetch-model-run-id", required=True)
    parser.add_argument("--source", choices=["prebuilt", "build"], default="build")
    parser.add_argument("--repo-id", default="")
    parser.add_argument("--revision", default="")
    parser.add_argument("--subfolder", default="")
    parser.add_argument("--allow-patterns", default="")
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--execution-provider", default="cpu")
    parser.add_argument("--extra-options", default="")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", choices=["true", "false"], default="false")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens-cap", type=int, default=1024)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--intra-op-num-threads", type=int, default=0)
    parser.add_argument("--agreement-tokens", type=int, default=16)
    arguments = parser.parse_args(argv)
    return LogOnnxRequest(
        fetch_model_run_id=arguments.fetch_model_run_id,
        source=arguments.source,
        repo_id=arguments.repo_id,
        revision=arguments.revision,
        subfolder=arguments.subfolder,
        allow_patterns=tuple(p for p in arguments.allow_patterns.split(",") if p),
        precision=arguments.precision,
        execution_provider=arguments.execution_provider,
        extra_options=arguments.extra_options,
        max_new_tokens=arguments.max_new_tokens,
        do_sample=arguments.do_sample == "true",
        temperature=arguments.temperature,
        top_p=arguments.top_p,
        max_tokens_cap=arguments.max_tokens_cap,
        max_batch_size=arguments.max_batch_size,
        intra_op_num_threads=arguments.intra_op_num_threads,
        agreement_tokens=arguments.agreement_tokens,
    )


if __name__ == "__main__":
    onnx_request = _parse_arguments(sys.argv[1:])
    exit_process(run_step("log_onnx", lambda run_id: log_onnx(onnx_request, run_id)))

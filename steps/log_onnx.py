"""Entry point ``log_onnx``: an ONNX build of the model as a pyfunc chat model on onnxruntime-genai.

Reads: `LogOnnxParameters` (``llm_packager/config/specs.py``, or ``--help``): the upstream
``fetch_model`` run (its weights for ``source=build``, and the reference for the greedy agreement
check); where the ONNX model comes from (``prebuilt``: a published folder, pinned to a commit;
``build``: the onnxruntime-genai model builder with a precision, execution provider and extra
options); the served model's generation defaults and limits; and the candidate name it is
evaluated under (``main`` runs this step once per ONNX candidate).

Writes (on its own run):
    a LoggedModel ``chat_model`` logged from code (``llm_packager/models/onnx_chat_model.py``,
    with ``llm_packager/serving`` in its ``code/`` folder as ``llm_packager_serving``) with the
    ONNX folder as artifact ``onnx_model``; its ``models:/<id>`` URI in the tags
    ``llm_packager.outputs`` and ``llm_packager.model_uri``; tags ``llm_packager.candidate`` and
    ``llm_packager.runtime`` (``onnx``); from a GGUF source, tag ``llm_packager.gguf_blocks``
    (``imported``: the int4 build computes the file's own blocks, listed in the ONNX folder's
    ``gguf_blocks.json``; or why it was re-quantized); param ``onnxruntime_genai_version``;
    artifacts ``sample_completion.json``, ``sample_prompt_answer.json`` and
    ``logs/onnx_builder.log``; metrics ``onnx_size_bytes``, ``load_seconds``, ``log_seconds``
    and ``greedy_token_agreement`` (vs transformers in ``agreement_dtype``: as stored by default).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from llm_packager.choices import ExecutionProvider, GgufBlocks, OnnxPrecision, OnnxSource
from llm_packager.config.specs import ONNX, LogOnnxParameters
from llm_packager.errors import InvalidParametersError
from llm_packager.keys import (
    CANDIDATE_METADATA,
    GGUF_BLOCKS_TAG,
    GGUF_SHA256_TAG,
    GREEDY_TOKEN_AGREEMENT_METRIC,
    HF_REPO_ID_TAG,
    LOAD_SECONDS_METRIC,
    LOG_ARTIFACT_DIR,
    LOG_SECONDS_METRIC,
    MODEL_NAME_TAG,
    ONNX_BUILDER_LOG,
    ONNX_REPO_ID_TAG,
    ONNX_RESOLVED_COMMIT_TAG,
    ONNX_SIZE_BYTES_METRIC,
    ONNXRUNTIME_GENAI_VERSION_PARAM,
    PRECISION_METADATA,
    SAMPLE_COMPLETION_ARTIFACT,
    SAMPLE_PROMPT_ANSWER_ARTIFACT,
    SOURCE_MODEL_METADATA,
)
from llm_packager.models.chat import (
    CHECK_MAX_TOKENS,
    EXAMPLE_CHAT_REQUEST,
    MalformedCompletionError,
    load_back_and_answer,
)
from llm_packager.models.gguf_blocks import (
    FLOAT_ACTIVATIONS,
    UnsupportedBlocksError,
    import_gguf_blocks,
)
from llm_packager.models.model_store import log_chat_model
from llm_packager.models.onnx_build import (
    RUNTIME_DISTRIBUTIONS,
    build_onnx_model,
    chat_signature,
    check_builder_supports,
    check_prebuilt_matches,
    hf_architecture,
)
from llm_packager.models.parity import chat_prompt_text
from llm_packager.models.served_code import MODEL_CODE, served_code_paths
from llm_packager.pipeline.reuse import announce_model, candidate_tags
from llm_packager.pipeline.step_run import run_command_line
from llm_packager.serving.keys import (
    BATCH_WAIT_MS_KEY,
    BATCHING_KEY,
    DO_SAMPLE_KEY,
    INTRA_OP_NUM_THREADS_KEY,
    MAX_BATCH_SIZE_KEY,
    MAX_NEW_TOKENS_KEY,
    MAX_QUEUED_REQUESTS_KEY,
    MAX_TOKENS_CAP_KEY,
    MODEL_NAME_KEY,
    ONNX_ARTIFACT_KEY,
    TEMPERATURE_KEY,
    TOP_P_KEY,
)
from llm_packager.sources.hub import download_pinned_snapshot
from llm_packager.sources.manifest import ModelFilesError, check_model_files, folder_bytes
from llm_packager.sources.upstream import FetchedModel, fetched_gguf, fetched_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogOnnxResult:
    """What the step logged and measured."""

    model_uri: str
    onnx_size_bytes: int
    load_seconds: float
    greedy_token_agreement: float | None


def _onnx_folder(request: LogOnnxParameters, fetched: FetchedModel, scratch: Path) -> Path:
    if request.source == OnnxSource.prebuilt:
        snapshot = download_pinned_snapshot(
            request.repo_id, request.revision, list(request.allow_patterns)
        )
        mlflow.set_tags(
            {ONNX_REPO_ID_TAG: request.repo_id, ONNX_RESOLVED_COMMIT_TAG: snapshot.commit}
        )
        folder = snapshot.folder / request.subfolder
        check_model_files(folder)
        # A published build is for one model: never package it as another one.
        check_prebuilt_matches(folder, fetched.folder)
        return folder
    # Checked again on the fetched files: the config may not have known the architecture.
    check_builder_supports(hf_architecture(fetched.folder))
    log_path = scratch / ONNX_BUILDER_LOG
    try:
        folder = build_onnx_model(
            fetched.folder,
            scratch / "onnx",
            precision=request.precision,
            execution_provider=request.execution_provider,
            extra_options=request.extra_options,
            log_path=log_path,
        )
    finally:
        if log_path.exists():
            mlflow.log_artifact(str(log_path), LOG_ARTIFACT_DIR)
    if GGUF_SHA256_TAG in fetched.tags:
        mlflow.set_tag(GGUF_BLOCKS_TAG, _carry_gguf_blocks(request, fetched, folder))
    return folder


def _carry_gguf_blocks(request: LogOnnxParameters, fetched: FetchedModel, folder: Path) -> str:
    """Put a GGUF source's own blocks into the int4 build where they carry over exactly; the
    tag's value: "imported", or why the builder's re-quantized weights stay."""
    if request.gguf_blocks == GgufBlocks.requantize:
        return "requantized: onnx.gguf_blocks=requantize"
    if (
        request.precision != OnnxPrecision.int4
        or request.execution_provider != ExecutionProvider.cpu
    ):
        return (f"requantized: blocks are carried into int4 CPU builds, this is "
                f"{request.precision.value} {request.execution_provider.value}")  # fmt: skip
    fast = request.gguf_blocks == GgufBlocks.fast
    try:
        gguf = fetched_gguf(fetched)
        summary = import_gguf_blocks(folder, gguf, fetched.tags[GGUF_SHA256_TAG],
                                     int8_activations=fast)  # fmt: skip
    except (UnsupportedBlocksError, ModelFilesError) as error:
        # The build stands as the builder made it: re-quantized from the verified weights.
        logger.warning("The GGUF's blocks were not carried over, the build re-quantized: %s", error)
        return f"requantized: {error}"
    # The import sets each matmul's accuracy level whatever extra_options asked: say so.
    float_activations = sum(
        level == FLOAT_ACTIVATIONS for level in summary.accuracy_levels.values()
    )
    int8_activations = len(summary.accuracy_levels) - float_activations
    logger.info("Carried the GGUF's blocks into %d matmuls (%d nodes added for Q4_1); %d on "
                "float activations, %d on int8 (onnx.gguf_blocks=%s)", len(summary.tensors),
                summary.correction_nodes, float_activations, int8_activations,
                request.gguf_blocks.value)  # fmt: skip
    notes = []
    if fast:
        notes.append("int8 activations (onnx.gguf_blocks=fast)")
    if summary.kept:
        notes.append(f"the builder's own weights kept for {', '.join(summary.kept)}")
    return "; ".join(["imported", *notes])


def _agreement(
    request: LogOnnxParameters, fetched: FetchedModel, onnx_folder: Path
) -> float | None:
    from llm_packager.models.parity import (
        chat_token_ids,
        greedy_onnx,
        greedy_transformers,
        prefix_agreement,
    )

    if request.agreement_tokens == 0 or request.execution_provider != ExecutionProvider.cpu:
        return None
    prompts = chat_token_ids(fetched.folder)
    reference = greedy_transformers(fetched.folder, prompts, request.agreement_tokens,
                                    request.agreement_dtype.value)  # fmt: skip
    return prefix_agreement(reference, greedy_onnx(onnx_folder, prompts, request.agreement_tokens))


def log_onnx(request: LogOnnxParameters, run_id: str) -> LogOnnxResult:
    """Get or build the ONNX model, log it from code, and check both request shapes."""
    import onnxruntime_genai

    from llm_packager.models.requirements import pinned

    if (
        request.execution_provider == ExecutionProvider.cuda
        and not onnxruntime_genai.is_cuda_available()
    ):
        raise InvalidParametersError(
            "onnx.execution_provider=cuda needs a GPU and onnxruntime-genai-cuda in place of "
            f"onnxruntime-genai (installed: onnxruntime-genai {onnxruntime_genai.__version__}, no "
            "CUDA); see README, 'Run on a GPU', or use a CPU onnx choice"
        )
    fetched = fetched_model(request.fetch_model_run_id)
    mlflow.set_tags({**fetched.lineage_tags(), **candidate_tags(request.candidate, ONNX.name)})
    model_name = fetched.tags.get(HF_REPO_ID_TAG, fetched.tags.get(MODEL_NAME_TAG, "model"))
    sample_prompt = chat_prompt_text(fetched.folder)
    with tempfile.TemporaryDirectory(prefix="log-onnx-") as scratch:
        onnx_folder = _onnx_folder(request, fetched, Path(scratch))
        check_model_files(onnx_folder)
        size = folder_bytes(onnx_folder)
        mlflow.log_params({ONNXRUNTIME_GENAI_VERSION_PARAM: onnxruntime_genai.__version__})
        agreement = _agreement(request, fetched, onnx_folder)
        started = time.perf_counter()
        with served_code_paths() as code_paths:
            model_uri = log_chat_model(
                mlflow.pyfunc,
                request.model_store,
                run_id,
                python_model=str(MODEL_CODE),
                code_paths=code_paths,
                artifacts={ONNX_ARTIFACT_KEY: str(onnx_folder)},
                model_config={
                    MODEL_NAME_KEY: f"{model_name} ({request.precision.value} onnx)",
                    MAX_NEW_TOKENS_KEY: request.max_new_tokens,
                    DO_SAMPLE_KEY: request.do_sample,
                    TEMPERATURE_KEY: request.temperature,
                    TOP_P_KEY: request.top_p,
                    MAX_TOKENS_CAP_KEY: request.max_tokens_cap,
                    BATCHING_KEY: request.batching.value,
                    MAX_BATCH_SIZE_KEY: request.max_batch_size,
                    MAX_QUEUED_REQUESTS_KEY: request.max_queued_requests,
                    BATCH_WAIT_MS_KEY: request.batch_wait_ms,
                    INTRA_OP_NUM_THREADS_KEY: request.intra_op_num_threads,
                },
                signature=chat_signature(),
                input_example=EXAMPLE_CHAT_REQUEST,
                pip_requirements=pinned(
                    "mlflow", *RUNTIME_DISTRIBUTIONS[request.execution_provider], "numpy", "pandas"
                ),
                metadata={
                    SOURCE_MODEL_METADATA: model_name,
                    PRECISION_METADATA: request.precision.value,
                    CANDIDATE_METADATA: request.candidate,
                },
            )
        log_seconds = time.perf_counter() - started
    check = load_back_and_answer(
        model_uri, {"prompt": sample_prompt, "max_tokens": CHECK_MAX_TOKENS}
    )
    chat_answer, prompt_answer = check.answers
    load_seconds = check.load_seconds
    if not isinstance(prompt_answer, str):
        raise MalformedCompletionError(
            f"a prompt request must be answered with text, got {prompt_answer!r}"
        )
    mlflow.log_dict(chat_answer, SAMPLE_COMPLETION_ARTIFACT)
    mlflow.log_dict({"prompt": sample_prompt, "answer": prompt_answer},
                    SAMPLE_PROMPT_ANSWER_ARTIFACT)  # fmt: skip
    metrics = {ONNX_SIZE_BYTES_METRIC: size, LOAD_SECONDS_METRIC: load_seconds,
               LOG_SECONDS_METRIC: log_seconds}  # fmt: skip
    if agreement is not None:
        metrics[GREEDY_TOKEN_AGREEMENT_METRIC] = agreement
    mlflow.log_metrics(metrics)
    announce_model(mlflow.MlflowClient(), run_id, model_uri)
    logger.info(
        "Logged %s: ONNX %d bytes, loads in %.2f s, greedy agreement %s",
        model_uri, size, load_seconds, agreement,
    )  # fmt: skip
    return LogOnnxResult(model_uri, size, load_seconds, agreement)


if __name__ == "__main__":
    run_command_line("log_onnx", log_onnx)

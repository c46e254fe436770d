"""Entry point ``log_transformers``: the fetched model as an MLflow transformers chat model.

Reads: `LogTransformersParameters` (``llm_packager/config/specs.py``, or ``--help``): the upstream
``fetch_model`` run, whose ``hf_model`` artifact is downloaded through MLflow (or taken from the
local cache after checking its sha256 manifest); generation defaults for the model_config; how the
weights are stored (``save_pretrained``) and loaded (``device``, ``dtype``).

Writes (on its own run):
    a LoggedModel (``mlflow.transformers``, ``task="llm/v1/chat"``, OpenAI chat signature), whose
    ``models:/<id>`` URI is announced in the tags ``llm_packager.outputs`` and
    ``llm_packager.model_uri``; tags ``llm_packager.candidate`` and ``llm_packager.runtime``
    (``transformers``), which name it in the evaluation; artifact ``sample_completion.json`` (the
    check request's answer); metrics ``model_size_bytes``, ``log_seconds`` and ``load_seconds``.

The step fails (before logging) if the tokenizer has no chat template, and (after logging) if the
model, loaded back by its URI, does not answer a chat request with a well-formed completion.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass

import mlflow

from llm_packager.choices import Device, TorchDtype
from llm_packager.config.specs import TRANSFORMERS, LogTransformersParameters
from llm_packager.errors import InvalidParametersError, UserError
from llm_packager.keys import (
    HF_REPO_ID_TAG,
    HF_RESOLVED_COMMIT_TAG,
    LOAD_SECONDS_METRIC,
    LOG_SECONDS_METRIC,
    MODEL_NAME_TAG,
    MODEL_SIZE_BYTES_METRIC,
    SAMPLE_COMPLETION_ARTIFACT,
    SOURCE_MODEL_METADATA,
)
from llm_packager.models.chat import load_back_and_answer
from llm_packager.models.model_store import log_chat_model
from llm_packager.pipeline.reuse import announce_model, candidate_tags
from llm_packager.pipeline.step_run import run_command_line
from llm_packager.sources.hub import HubUnreachableError, hub_endpoint, probe_hub
from llm_packager.sources.upstream import FetchedModel, fetched_model

logger = logging.getLogger(__name__)


class ChatTemplateMissingError(UserError, ValueError):
    """The tokenizer cannot turn chat messages into a prompt."""


@dataclass(frozen=True)
class LogTransformersResult:
    """What the step logged and measured."""

    model_uri: str
    model_size_bytes: int
    log_seconds: float
    load_seconds: float


def _model_config(request: LogTransformersParameters) -> dict[str, object]:
    config: dict[str, object] = {
        "max_new_tokens": request.max_new_tokens,
        "do_sample": request.do_sample,
    }
    # Sampling settings only mean something when sampling; transformers warns about them otherwise.
    if request.do_sample:
        config |= {"temperature": request.temperature, "top_p": request.top_p}
    return config


def _torch_dtype(request: LogTransformersParameters):
    """The torch dtype asked for (None for ``auto``), after checking the device exists."""
    import torch

    if request.device == Device.cuda and not torch.cuda.is_available():
        raise InvalidParametersError(
            "transformers.device=cuda, but torch sees no CUDA GPU here (torch "
            f"{torch.__version__}); run on a GPU machine with a CUDA build of torch (see README, "
            "'Run on a GPU'), or drop transformers=cuda"
        )
    if request.dtype == TorchDtype.auto:
        return None
    return getattr(torch, request.dtype.value)


def _hub_reference(fetched: FetchedModel, run_id: str) -> str:
    """The repo id to log by reference, after checking the Hub still serves the pinned commit."""
    from huggingface_hub import HfApi

    repo_id = fetched.tags.get(HF_REPO_ID_TAG)
    commit = fetched.tags.get(HF_RESOLVED_COMMIT_TAG)
    if not repo_id or not commit:
        raise InvalidParametersError(
            f"save_pretrained=false needs a model fetched from the Hub; fetch_model run {run_id} "
            f"has no {HF_REPO_ID_TAG} / {HF_RESOLVED_COMMIT_TAG} tags"
        )
    try:
        probe_hub(hub_endpoint())
    except HubUnreachableError as error:
        raise HubUnreachableError(
            f"save_pretrained=false needs the Hugging Face Hub, which cannot be reached ({error}). "
            "Keep transformers.save_pretrained=true to store the weights in the model instead."
        ) from error
    # MLflow records the repo's latest commit for a reference, not a revision we choose; refuse
    # when that is not the commit we fetched and verified.
    latest = HfApi().model_info(repo_id).sha
    if latest != commit:
        raise InvalidParametersError(
            f"{repo_id} has moved on to {latest}, but the fetched model is {commit}; a reference "
            "would load different weights. Keep transformers.save_pretrained=true."
        )
    return repo_id


def log_transformers(request: LogTransformersParameters, run_id: str) -> LogTransformersResult:
    """Log the upstream model as an ``llm/v1/chat`` transformers model and check it answers."""
    import transformers
    from huggingface_hub import ModelCard

    from llm_packager.models.requirements import pinned

    dtype = _torch_dtype(request)
    fetched = fetched_model(request.fetch_model_run_id)
    mlflow.set_tags({**fetched.lineage_tags(), **candidate_tags(request.candidate,
                                                                TRANSFORMERS.name)})  # fmt: skip
    model_name = fetched.tags.get(MODEL_NAME_TAG, "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(fetched.folder)
    if not tokenizer.chat_template:
        raise ChatTemplateMissingError(
            f"The tokenizer of model '{model_name}' (fetch_model run {request.fetch_model_run_id}) "
            "has no chat template, so chat messages cannot be turned into a prompt; use a chat "
            "(instruct) model or add a chat_template to its tokenizer_config.json"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        fetched.folder, dtype=dtype or "auto"
    ).to(request.device.value)
    # The name shows up as "model" in every completion and, for a reference, names the Hub repo;
    # the cache path it would otherwise carry means nothing to a client.
    model.name_or_path = (
        _hub_reference(fetched, request.fetch_model_run_id)
        if not request.save_pretrained
        else fetched.tags.get(HF_REPO_ID_TAG, model_name)
    )
    pipeline = transformers.pipeline(
        task="text-generation", model=model, tokenizer=tokenizer, device=model.device
    )
    readme = fetched.folder / "README.md"
    started = time.perf_counter()
    model_uri = log_chat_model(
        mlflow.transformers,
        request.model_store,
        run_id,
        transformers_model=pipeline,
        task="llm/v1/chat",
        model_config=_model_config(request),
        save_pretrained=request.save_pretrained,
        # Recorded in the flavor, so every load (serving too) uses it; None keeps the stored one.
        torch_dtype=dtype,
        pip_requirements=pinned("mlflow", "transformers", "torch", "tokenizers", "safetensors"),
        # No input_example: MLflow would check it by loading a second copy of the weights beside
        # the one being logged (two copies at the step's peak: 15 GB for Phi-3-mini), and this
        # flavor offers no way to skip that check. The task gives the OpenAI chat signature, and
        # the load-back check below answers the same example from the logged model.
        model_card=ModelCard.load(readme) if readme.is_file() else None,
        metadata={SOURCE_MODEL_METADATA: model_name},
    )
    log_seconds = time.perf_counter() - started
    # One copy of the weights at a time: the logged model is loaded back for the check only
    # after the one it was logged from is gone (for Phi-3-mini, 7.6 GB less at the step's peak).
    del pipeline, model
    gc.collect()
    check = load_back_and_answer(model_uri)
    size, load_seconds = check.size_bytes, check.load_seconds
    mlflow.log_dict(check.answers[0], SAMPLE_COMPLETION_ARTIFACT)
    mlflow.log_metrics(
        {
            MODEL_SIZE_BYTES_METRIC: size,
            LOG_SECONDS_METRIC: log_seconds,
            LOAD_SECONDS_METRIC: load_seconds,
        }
    )
    announce_model(mlflow.MlflowClient(), run_id, model_uri)
    logger.info(
        "Logged %s (%d bytes) in %.1f s; loads in %.2f s",
        model_uri, size, log_seconds, load_seconds,
    )  # fmt: skip
    return LogTransformersResult(model_uri, size, log_seconds, load_seconds)


def _offline_hub_for_local_weights(request: LogTransformersParameters) -> None:
    if request.save_pretrained:
        # Logging local weights needs no network, but MLflow still asks the Hub for a license
        # file (about 45 s of retries offline). Must be set before huggingface_hub loads.
        os.environ["HF_HUB_OFFLINE"] = "1"


if __name__ == "__main__":
    run_command_line("log_transformers", log_transformers, prepare=_offline_hub_for_local_weights)

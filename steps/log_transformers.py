"""Entry point ``log_transformers``: the fetched model as an MLflow transformers chat model.

Reads (MLproject parameters):
    fetch_model_run_id: the upstream fetch_model run; its ``hf_model`` artifact is downloaded
        through MLflow (or taken from the local cache after checking the sha256 manifest).
    max_new_tokens, do_sample, temperature, top_p: generation defaults for the model_config.
    save_pretrained: ``true`` copies the weights into the model; ``false`` logs a Hub model by
        reference to its repo and commit.
    device: ``cpu`` or ``cuda``, where the step loads and checks the model.
    dtype: ``auto`` (as stored), ``float32``, ``float16`` or ``bfloat16``, recorded in the model
        so that every load uses it.

Writes (on its own run):
    a LoggedModel (``mlflow.transformers``, ``task="llm/v1/chat"``, OpenAI chat signature), whose
    ``models:/<id>`` URI is announced in the tags ``llm_packager.outputs`` and
    ``llm_packager.model_uri``; artifact ``sample_completion.json`` (the check request's answer);
    metrics ``model_size_bytes``, ``log_seconds`` and ``load_seconds``.

The step fails (before logging) if the tokenizer has no chat template, and (after logging) if the
model, loaded back by its URI, does not answer a chat request with a well-formed completion.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from llm_packager.chat import EXAMPLE_CHAT_REQUEST, check_chat_completion
from llm_packager.hub import HubUnreachableError, hub_endpoint, probe_hub
from llm_packager.manifest import folder_bytes
from llm_packager.reuse import announce_model
from llm_packager.step_run import exit_process, run_step
from llm_packager.upstream import FetchedModel, fetched_model

CHECK_MAX_TOKENS = 8
logger = logging.getLogger(__name__)


class ChatTemplateMissingError(ValueError):
    """The tokenizer cannot turn chat messages into a prompt."""


@dataclass(frozen=True)
class LogTransformersRequest:
    """Mirrors the entry point's parameters."""

    fetch_model_run_id: str
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    save_pretrained: bool = True
    device: str = "cpu"
    dtype: str = "auto"


@dataclass(frozen=True)
class LogTransformersResult:
    """What the step logged and measured."""

    model_uri: str
    model_size_bytes: int
    log_seconds: float
    load_seconds: float


def _model_config(request: LogTransformersRequest) -> dict[str, object]:
    config: dict[str, object] = {
        "max_new_tokens": request.max_new_tokens,
        "do_sample": request.do_sample,
    }
    # Sampling settings only mean something when sampling; transformers warns about them otherwise.
    if request.do_sample:
        config |= {"temperature": request.temperature, "top_p": request.top_p}
    return config


def _torch_dtype(request: LogTransformersRequest):
    """The torch dtype asked for (None for ``auto``), after checking the device exists."""
    import torch

    if request.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "transformers.device=cuda, but torch sees no CUDA GPU here (torch "
            f"{torch.__version__}); run on a GPU machine with a CUDA build of torch (see README, "
            "'Run on a GPU'), or drop transformers=cuda"
        )
    if request.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got '{request.device}'")
    if request.dtype == "auto":
        return None
    if request.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16; got '{request.dtype}'")
    return getattr(torch, request.dtype)


def _hub_reference(fetched: FetchedModel, run_id: str) -> str:
    """The repo id to log by reference, after checking the Hub still serves the pinned commit."""
    from huggingface_hub import HfApi

    repo_id = fetched.tags.get("hf.repo_id")
    commit = fetched.tags.get("hf.resolved_commit")
    if not repo_id or not commit:
        raise ValueError(
            f"save_pretrained=false needs a model fetched from the Hub; fetch_model run {run_id} "
            "has no hf.repo_id / hf.resolved_commit tags"
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
        raise ValueError(
            f"{repo_id} has moved on to {latest}, but the fetched model is {commit}; a reference "
            "would load different weights. Keep transformers.save_pretrained=true."
        )
    return repo_id


def log_transformers(request: LogTransformersRequest, run_id: str) -> LogTransformersResult:
    """Log the upstream model as an ``llm/v1/chat`` transformers model and check it answers."""
    import transformers
    from huggingface_hub import ModelCard

    from llm_packager.requirements import pinned

    dtype = _torch_dtype(request)
    fetched = fetched_model(request.fetch_model_run_id)
    mlflow.set_tags(fetched.lineage_tags())
    model_name = fetched.tags.get("llm_packager.model_name", "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(fetched.folder)
    if not tokenizer.chat_template:
        raise ChatTemplateMissingError(
            f"The tokenizer of model '{model_name}' (fetch_model run {request.fetch_model_run_id}) "
            "has no chat template, so chat messages cannot be turned into a prompt; use a chat "
            "(instruct) model or add a chat_template to its tokenizer_config.json"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        fetched.folder, dtype=dtype or "auto"
    ).to(request.device)
    # The name shows up as "model" in every completion and, for a reference, names the Hub repo;
    # the cache path it would otherwise carry means nothing to a client.
    model.name_or_path = (
        _hub_reference(fetched, request.fetch_model_run_id)
        if not request.save_pretrained
        else fetched.tags.get("hf.repo_id", model_name)
    )
    pipeline = transformers.pipeline(
        task="text-generation", model=model, tokenizer=tokenizer, device=model.device
    )
    readme = fetched.folder / "README.md"
    started = time.perf_counter()
    model_info = mlflow.transformers.log_model(
        pipeline,
        name="chat_model",
        task="llm/v1/chat",
        model_config=_model_config(request),
        save_pretrained=request.save_pretrained,
        # Recorded in the flavor, so every load (serving too) uses it; None keeps the stored one.
        torch_dtype=dtype,
        pip_requirements=pinned("mlflow", "transformers", "torch", "tokenizers", "safetensors"),
        input_example=EXAMPLE_CHAT_REQUEST,
        model_card=ModelCard.load(readme) if readme.is_file() else None,
        metadata={"source_model": model_name},
    )
    log_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="logged-model-") as scratch:
        local = Path(mlflow.artifacts.download_artifacts(model_info.model_uri, dst_path=scratch))
        size = folder_bytes(local)
        started = time.perf_counter()
        loaded = mlflow.pyfunc.load_model(str(local))
        load_seconds = time.perf_counter() - started
        answer = loaded.predict({**EXAMPLE_CHAT_REQUEST, "max_tokens": CHECK_MAX_TOKENS})
    check_chat_completion(answer[0], max_tokens=CHECK_MAX_TOKENS)
    mlflow.log_dict(answer[0], "sample_completion.json")
    mlflow.log_metrics(
        {"model_size_bytes": size, "log_seconds": log_seconds, "load_seconds": load_seconds}
    )
    announce_model(mlflow.MlflowClient(), run_id, model_info.model_uri)
    logger.info(
        "Logged %s (%d bytes) in %.1f s; loads in %.2f s",
        model_info.model_uri, size, log_seconds, load_seconds,
    )  # fmt: skip
    return LogTransformersResult(model_info.model_uri, size, log_seconds, load_seconds)


def _parse_arguments(argv: list[str]) -> LogTransformersRequest:
    parser = argparse.ArgumentParser(description="Log a fetched model as an MLflow chat model.")
    parser.add_argument("--fetch-model-run-id", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", choices=["true", "false"], default="false")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--save-pretrained", choices=["true", "false"], default="true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    arguments = parser.parse_args(argv)
    return LogTransformersRequest(
        fetch_model_run_id=arguments.fetch_model_run_id,
        max_new_tokens=arguments.max_new_tokens,
        do_sample=arguments.do_sample == "true",
        temperature=arguments.temperature,
        top_p=arguments.top_p,
        save_pretrained=arguments.save_pretrained == "true",
        device=arguments.device,
        dtype=arguments.dtype,
    )


if __name__ == "__main__":
    log_request = _parse_arguments(sys.argv[1:])
    if log_request.save_pretrained:
        # Logging local weights needs no network, but MLflow still asks the Hub for a model card
        # and license (about 45 s of retries offline). Must be set before huggingface_hub loads.
        os.environ["HF_HUB_OFFLINE"] = "1"
    exit_process(run_step("log_transformers", lambda run_id: log_transformers(log_request, run_id)))

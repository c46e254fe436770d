"""Entry point ``register``: the evaluated winner into the Model Registry under an alias.

Reads (MLproject parameters):
    evaluate_run_id: the upstream evaluate run (verdicts, recommended model, metrics).
    registered_model_name: the registered model to add a version to.
    alias: set on the recommended model's version (e.g. ``champion``), only if it passed the gate.
    challenger_alias: set on the other model's version if it passed too (empty: never).
    allow_unvalidated: ``true`` registers the policy's pick even if no model passed (tagged).
    registry_uri: where to register (empty: the tracking server's registry; ``databricks-uc``:
        Unity Catalog, which needs a three-level ``catalog.schema.model`` name).

Writes:
    on its own run: tags ``registration_status`` (registered/skipped), ``registration_reason``,
    ``registered_version``, ``llm_packager.summary`` (printed by ``main``);
    on the model version: lineage tags (flavor, verdict, key metrics, the run ids of every step,
    git commit, config hash, Hugging Face repo and revision) and a description.

Registering the same LoggedModel again returns its existing version (no duplicates), and an alias
moves only once that version is READY. If no model passed, nothing is registered and every
existing alias stays where it was; that is a result, not a failure (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.exceptions import MlflowException

from llm_packager.chat import EXAMPLE_CHAT_REQUEST, check_chat_completion
from llm_packager.evaluation import MODEL_METRICS, recommend
from llm_packager.registry import check_alias, check_registered_model_name
from llm_packager.reuse import announce_outputs
from llm_packager.step_run import SUMMARY_TAG, exit_process, run_step
from llm_packager.upstream import FETCH_RUN_TAG

MODEL_NAMES = ("transformers", "onnx")
KEY_METRICS = ("exact_match", "token_f1", "decode_tokens_per_s", "latency_p95_s",
               "peak_rss_generate_mib", "model_size_mib")  # fmt: skip
READY_TIMEOUT_SECONDS = 600
CHECK_MAX_TOKENS = 8
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterRequest:
    """Mirrors the entry point's parameters."""

    evaluate_run_id: str
    registered_model_name: str
    alias: str = "champion"
    challenger_alias: str = "challenger"
    allow_unvalidated: bool = False
    registry_uri: str = ""


@dataclass(frozen=True)
class RegisterResult:
    """What was registered, or why nothing was."""

    status: str
    reason: str
    version: str | None = None
    model: str | None = None


def _evaluation(client, evaluate_run_id: str):
    run = client.get_run(evaluate_run_id)
    tags = run.data.tags
    models = [name for name in MODEL_NAMES if f"{name}.model_uri" in tags]
    if not models:
        raise ValueError(f"evaluate run {evaluate_run_id} evaluated no model")
    metrics = {
        name: {
            m: run.data.metrics[f"{name}.{m}"]
            for m in MODEL_METRICS
            if f"{name}.{m}" in run.data.metrics
        }
        for name in models
    }
    return run, models, metrics


def _wait_until_ready(client, version: ModelVersion) -> ModelVersion:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while version.status != ModelVersionStatus.to_string(ModelVersionStatus.READY):
        if version.status == ModelVersionStatus.to_string(ModelVersionStatus.FAILED_REGISTRATION):
            raise MlflowException(f"version {version.version} of {version.name} failed to register")
        if time.monotonic() > deadline:
            raise TimeoutError(f"version {version.version} of {version.name} is not READY")
        time.sleep(2)
        version = client.get_model_version(version.name, version.version)
    return version


def _version_for(client, name: str, model_uri: str) -> ModelVersion:
    """The existing version of this LoggedModel, or a new one; READY either way."""
    model_id = model_uri.removeprefix("models:/")
    try:
        existing = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        existing = []
    for version in existing:
        if version.model_id == model_id or version.source == model_uri:
            logger.info("%s version %s already holds %s", name, version.version, model_uri)
            return _wait_until_ready(client, version)
    return _wait_until_ready(client, mlflow.register_model(model_uri, name))


def _lineage(client, evaluation, model: str, metrics, register_run_id: str) -> dict[str, str]:
    tags = evaluation.data.tags
    log_run = client.get_run(tags[f"{model}.run_id"])
    lineage = {
        "flavor": "transformers"
        if model == "transformers"
        else "python_function (onnxruntime-genai)",
        "validation_status": tags[f"{model}.validation_status"],
        "validation_reasons": tags[f"{model}.validation_reasons"],
        "recommended_by": tags.get("recommendation_policy", ""),
        f"run.log_{model}": log_run.info.run_id,
        "run.evaluate": evaluation.info.run_id,
        "run.register": register_run_id,
        "git_commit": log_run.data.tags.get("mlflow.source.git.commit", "unknown"),
        "code_version": log_run.data.tags.get("llm_packager.code_version", "unknown"),
        "random_weights": log_run.data.tags.get("synthetic.random_weights", "false"),
    }
    if fetch_run := log_run.data.tags.get(FETCH_RUN_TAG):
        lineage["run.fetch_model"] = fetch_run
    for key in ("hf.repo_id", "hf.resolved_commit"):
        if key in log_run.data.tags:
            lineage[key] = log_run.data.tags[key]
    if parent := evaluation.data.tags.get("mlflow.parentRunId"):
        lineage["run.main"] = parent
        config_hash = client.get_run(parent).data.tags.get("llm_packager.config_hash")
        if config_hash:
            lineage["config_hash"] = config_hash
    for name in KEY_METRICS:
        if name in metrics[model]:
            lineage[f"metric.{name}"] = f"{metrics[model][name]:.4g}"
    return lineage


def _description(model: str, lineage: dict[str, str]) -> str:
    figures = ", ".join(
        f"{k.removeprefix('metric.')} {v}" for k, v in lineage.items() if k.startswith("metric.")
    )
    warning = (
        " Random weights: quality figures mean nothing."
        if lineage["random_weights"] == "true"
        else ""
    )
    return (
        f"{model} model, gate {lineage['validation_status']} "
        f"({lineage['validation_reasons']}); {figures}. Evaluated in run "
        f"{lineage['run.evaluate']}.{warning}"
    )


def _record_decision(client, run_id: str, decision: dict, model_version: str = "") -> None:
    # The decision is this step's output: a rerun with the same inputs reuses it, whether it
    # registered a version or deliberately registered nothing.
    mlflow.log_dict(decision, "registration.json")
    outputs = {"decision": f"runs:/{run_id}/registration.json"}
    if model_version:
        outputs["model_version"] = model_version
    announce_outputs(client, run_id, outputs)


def register(request: RegisterRequest, run_id: str) -> RegisterResult:
    """Register the recommended model and point the alias at it, if the gate allows."""
    # Checked before anything is read or registered: the step may be run without main's checks.
    check_registered_model_name(request.registered_model_name, request.registry_uri)
    check_alias(request.alias)
    if request.challenger_alias:
        check_alias(request.challenger_alias)
    if request.registry_uri:
        mlflow.set_registry_uri(request.registry_uri)
    client = mlflow.MlflowClient()
    evaluation, models, metrics = _evaluation(client, request.evaluate_run_id)
    tags = evaluation.data.tags
    verdicts = {name: tags[f"{name}.validation_status"] for name in models}
    recommended = tags.get("recommended_model", "none")
    unvalidated = False
    if recommended == "none":
        reasons = "; ".join(f"{name}: {tags[f'{name}.validation_reasons']}" for name in models)
        if not request.allow_unvalidated:
            reason = f"no model passed the evaluation gate ({reasons})"
            summary = f"Model not registered: {reason}. Aliases were left unchanged."
            mlflow.set_tags({"registration_status": "skipped", "registration_reason": reason,
                             SUMMARY_TAG: summary})  # fmt: skip
            _record_decision(client, run_id, {"status": "skipped", "reason": reason})
            logger.warning(summary)
            return RegisterResult("skipped", reason)
        recommended = recommend(tags.get("recommendation_policy", "fastest_passed"), metrics,
                                dict.fromkeys(models, "passed"))  # fmt: skip
        unvalidated = True
    versions = {}
    version = _version_for(client, request.registered_model_name, tags[f"{recommended}.model_uri"])
    versions[recommended] = version
    if request.challenger_alias:
        for other in models:
            if other != recommended and verdicts[other] == "passed":
                versions[other] = _version_for(client, request.registered_model_name,
                                               tags[f"{other}.model_uri"])  # fmt: skip
    for model, model_version in versions.items():
        lineage = _lineage(client, evaluation, model, metrics, run_id)
        if unvalidated and model == recommended:
            lineage["registered_unvalidated"] = "true"
        for key, value in lineage.items():
            client.set_model_version_tag(
                request.registered_model_name, model_version.version, key, value
            )
        client.update_model_version(request.registered_model_name, model_version.version,
                                    description=_description(model, lineage))  # fmt: skip
    aliases = {request.alias: version.version}
    # At most one other model exists, so the challenger alias names at most one version.
    for model, model_version in versions.items():
        if model != recommended:
            aliases[request.challenger_alias] = model_version.version
    # Aliases move last, once every version they point at is READY and described.
    for alias, alias_version in aliases.items():
        client.set_registered_model_alias(request.registered_model_name, alias, alias_version)
    alias_uri = f"models:/{request.registered_model_name}@{request.alias}"
    answer = mlflow.pyfunc.load_model(alias_uri).predict(
        {**EXAMPLE_CHAT_REQUEST, "max_tokens": CHECK_MAX_TOKENS}
    )
    check_chat_completion(answer[0], max_tokens=CHECK_MAX_TOKENS)
    reason = "registered without passing the gate (allow_unvalidated)" if unvalidated else (
        f"{recommended} passed the gate and was recommended"
    )  # fmt: skip
    summary = (
        f"Registered {request.registered_model_name} version {version.version} ({recommended}) "
        f"as @{request.alias}: {alias_uri}"
    )
    mlflow.set_tags({
        "registration_status": "registered", "registration_reason": reason,
        "registered_version": version.version, "registered_model": recommended,
        "registered_unvalidated": str(unvalidated).lower(), SUMMARY_TAG: summary,
    })  # fmt: skip
    _record_decision(
        client, run_id,
        {"status": "registered", "reason": reason, "model": recommended, "aliases": aliases},
        model_version=f"models:/{request.registered_model_name}/{version.version}",
    )  # fmt: skip
    logger.info(summary)
    return RegisterResult("registered", reason, version.version, recommended)


def _parse_arguments(argv: list[str]) -> RegisterRequest:
    parser = argparse.ArgumentParser(description="Register the evaluated winner.")
    parser.add_argument("--evaluate-run-id", required=True)
    parser.add_argument("--registered-model-name", required=True)
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--challenger-alias", default="challenger")
    parser.add_argument("--allow-unvalidated", choices=["true", "false"], default="false")
    parser.add_argument("--registry-uri", default="")
    arguments = parser.parse_args(argv)
    return RegisterRequest(
        evaluate_run_id=arguments.evaluate_run_id,
        registered_model_name=arguments.registered_model_name,
        alias=arguments.alias,
        challenger_alias=arguments.challenger_alias,
        allow_unvalidated=arguments.allow_unvalidated == "true",
        registry_uri=arguments.registry_uri,
    )


if __name__ == "__main__":
    register_request = _parse_arguments(sys.argv[1:])
    exit_process(run_step("register", lambda run_id: register(register_request, run_id)))

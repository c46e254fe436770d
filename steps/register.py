"""Entry point ``register``: the evaluated winner into the Model Registry under an alias.

Reads: `RegisterParameters` (``llm_packager/config/specs.py``, or ``--help``): the upstream
evaluate run,
whose ``evaluation.json`` (``llm_packager.evaluation.record``) says which candidates passed and
which one the policy recommends; the registered model name, the aliases, whether an unvalidated
pick may be registered, and the registry (empty: the tracking server's; ``databricks-uc``: Unity
Catalog, which needs a three-level ``catalog.schema.model`` name).

Writes:
    on its own run: tags ``registration_status`` (registered/skipped), ``registration_reason``,
    ``registered_version``, ``registered_candidate``, ``llm_packager.summary`` (printed by
    ``main``); artifact ``registration.json``;
    on each model version: lineage tags (flavor, candidate, verdict, key metrics, the run ids of
    every step, git commit, config hash, Hugging Face repo and revision) and a description.

The recommended candidate gets ``alias``; the runner-up by the same policy gets
``challenger_alias`` if it passed too, and otherwise that alias is removed, so it never points at
an older run's model. On a registry without aliases (Azure ML's) each alias is the version tag
``alias.<alias>`` instead, moved the same way (``llm_packager.models.registry``). Registering
the same LoggedModel again returns its existing version (no duplicates), and an alias moves only
once its version is READY. If no candidate passed, nothing is registered and every alias stays
where it was; that is a result, not a failure (exit 0).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from llm_packager.config.specs import (
    EVALUATE,
    FETCH_MODEL,
    MAIN,
    REGISTER,
    RegisterParameters,
    runtime_named,
)
from llm_packager.errors import retry_after_insert_race
from llm_packager.evaluation.record import CandidateResult, Evaluation
from llm_packager.keys import (
    CODE_VERSION_TAG,
    CONFIG_HASH_TAG,
    DECISION_OUTPUT,
    DECODE_TOKENS_PER_S_METRIC,
    EXACT_MATCH_METRIC,
    FETCH_RUN_TAG,
    FLAVOR_TAG,
    GIT_COMMIT_TAG,
    HF_REPO_ID_TAG,
    HF_RESOLVED_COMMIT_TAG,
    LATENCY_P95_S_METRIC,
    MODEL_SIZE_MIB_METRIC,
    MODEL_VERSION_OUTPUT,
    PEAK_RSS_GENERATE_MIB_METRIC,
    RANDOM_WEIGHTS_TAG,
    RECOMMENDED_BY_TAG,
    REGISTERED_CANDIDATE_TAG,
    REGISTERED_UNVALIDATED_TAG,
    REGISTERED_VERSION_TAG,
    REGISTRATION_ARTIFACT,
    REGISTRATION_REASON_TAG,
    REGISTRATION_STATUS_TAG,
    SUMMARY_TAG,
    TOKEN_F1_METRIC,
    VALIDATION_REASONS_TAG,
    VALIDATION_STATUS_TAG,
    VERSION_CANDIDATE_TAG,
    VERSION_CODE_VERSION_TAG,
    VERSION_CONFIG_HASH_TAG,
    alias_tag_key,
    is_metric_lineage_key,
    metric_lineage_key,
    metric_of_lineage_key,
    run_lineage_key,
)
from llm_packager.models.chat import load_back_and_answer
from llm_packager.models.model_store import MODEL_VERSIONS_PAGE_SIZE, all_pages
from llm_packager.models.registry import (
    check_alias,
    check_registered_model_name,
    existing_version,
    remove_alias,
    set_alias,
)
from llm_packager.pipeline.reuse import announce_outputs
from llm_packager.pipeline.step_run import run_command_line

KEY_METRICS = (
    EXACT_MATCH_METRIC,
    TOKEN_F1_METRIC,
    DECODE_TOKENS_PER_S_METRIC,
    LATENCY_P95_S_METRIC,
    PEAK_RSS_GENERATE_MIB_METRIC,
    MODEL_SIZE_MIB_METRIC,
)
READY_TIMEOUT_SECONDS = 600
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    """What was registered, or why nothing was."""

    status: str
    reason: str
    version: str | None = None
    candidate: str | None = None


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


def _versions_of(client, name: str) -> list[ModelVersion]:
    """Every version of the registered model ``name``, a page at a time within the limit."""
    return list(all_pages(client.search_model_versions, MODEL_VERSIONS_PAGE_SIZE,
                          filter_string=f"name = '{name}'"))  # fmt: skip


def _version_for(client, name: str, candidate: CandidateResult) -> ModelVersion:
    """The existing version of this candidate's model, or a new one; READY either way."""
    versions = _versions_of(client, name)
    if version := existing_version(versions, candidate.model_uri, candidate.run_id):
        logger.info("%s version %s already holds %s", name, version.version, candidate.model_uri)
        return _wait_until_ready(client, version)
    created = mlflow.register_model(candidate.model_uri, name)
    # Two pipelines may both have found no version and both registered one. Version numbers
    # follow creation order, and the later creator always sees the earlier version here: the
    # oldest stays, and whoever created a newer duplicate deletes it (no alias points at it yet).
    oldest = existing_version(_versions_of(client, name), candidate.model_uri,
                              candidate.run_id)  # fmt: skip
    if oldest is not None and oldest.version != created.version:
        logger.info("%s version %s already holds %s (registered concurrently); removing the "
                    "duplicate version %s", name, oldest.version, candidate.model_uri,
                    created.version)  # fmt: skip
        client.delete_model_version(name, created.version)
        return _wait_until_ready(client, oldest)
    return _wait_until_ready(client, created)


def _lineage(client, evaluation: Evaluation, candidate: CandidateResult,
             evaluate_run_id: str, register_run_id: str) -> dict[str, str]:  # fmt: skip
    log_run = client.get_run(candidate.run_id)
    runtime = runtime_named(candidate.runtime)
    lineage = {
        FLAVOR_TAG: runtime.flavor,
        VERSION_CANDIDATE_TAG: candidate.name,
        VALIDATION_STATUS_TAG: candidate.verdict.status,
        VALIDATION_REASONS_TAG: candidate.verdict.explanation(),
        RECOMMENDED_BY_TAG: evaluation.recommendation.policy.value,
        run_lineage_key(runtime.log_step.entry_point): candidate.run_id,
        run_lineage_key(EVALUATE.entry_point): evaluate_run_id,
        run_lineage_key(REGISTER.entry_point): register_run_id,
        GIT_COMMIT_TAG: log_run.data.tags.get(MLFLOW_GIT_COMMIT, "unknown"),
        VERSION_CODE_VERSION_TAG: log_run.data.tags.get(CODE_VERSION_TAG, "unknown"),
        RANDOM_WEIGHTS_TAG: str(evaluation.random_weights).lower(),
    }
    if fetch_run := log_run.data.tags.get(FETCH_RUN_TAG):
        lineage[run_lineage_key(FETCH_MODEL.entry_point)] = fetch_run
    for key in (HF_REPO_ID_TAG, HF_RESOLVED_COMMIT_TAG):
        if key in log_run.data.tags:
            lineage[key] = log_run.data.tags[key]
    if parent := client.get_run(evaluate_run_id).data.tags.get(MLFLOW_PARENT_RUN_ID):
        lineage[run_lineage_key(MAIN.entry_point)] = parent
        config_hash = client.get_run(parent).data.tags.get(CONFIG_HASH_TAG)
        if config_hash:
            lineage[VERSION_CONFIG_HASH_TAG] = config_hash
    for name in KEY_METRICS:
        if name in candidate.metrics:
            lineage[metric_lineage_key(name)] = f"{candidate.metrics[name]:.4g}"
    return lineage


def _description(model: str, lineage: dict[str, str]) -> str:
    figures = ", ".join(
        f"{metric_of_lineage_key(k)} {v}" for k, v in lineage.items() if is_metric_lineage_key(k)
    )
    warning = (
        " Random weights: quality figures mean nothing."
        if lineage[RANDOM_WEIGHTS_TAG] == "true"
        else ""
    )
    return (
        f"{model} model, gate {lineage[VALIDATION_STATUS_TAG]} "
        f"({lineage[VALIDATION_REASONS_TAG]}); {figures}. Evaluated in run "
        f"{lineage[run_lineage_key(EVALUATE.entry_point)]}.{warning}"
    )


def _record_decision(client, run_id: str, decision: dict, model_version: str = "") -> None:
    # The decision is this step's output: a rerun with the same inputs reuses it, whether it
    # registered a version or deliberately registered nothing.
    mlflow.log_dict(decision, REGISTRATION_ARTIFACT)
    outputs = {DECISION_OUTPUT: f"runs:/{run_id}/{REGISTRATION_ARTIFACT}"}
    if model_version:
        outputs[MODEL_VERSION_OUTPUT] = model_version
    announce_outputs(client, run_id, outputs)


def register(request: RegisterParameters, run_id: str) -> RegisterResult:
    """Register the recommended candidate and point the aliases, if the gate allows."""
    # Checked before anything is read or registered: the step may be run without main's checks.
    check_registered_model_name(request.registered_model_name, request.registry_uri)
    check_alias(request.alias)
    if request.challenger_alias:
        check_alias(request.challenger_alias)
    if request.registry_uri:
        mlflow.set_registry_uri(request.registry_uri)
    client = mlflow.MlflowClient()
    evaluation = Evaluation.load(request.evaluate_run_id)
    recommended = evaluation.recommendation.candidate
    unvalidated = recommended is None
    if unvalidated:
        reasons = "; ".join(f"{c.name}: {c.verdict.explanation()}" for c in evaluation.candidates)
        if not request.allow_unvalidated:
            reason = f"no model passed the evaluation gate ({reasons})"
            summary = f"Model not registered: {reason}. Aliases were left unchanged."
            mlflow.set_tags({REGISTRATION_STATUS_TAG: "skipped", REGISTRATION_REASON_TAG: reason,
                             SUMMARY_TAG: summary})  # fmt: skip
            _record_decision(client, run_id, {"status": "skipped", "reason": reason})
            logger.warning(summary)
            return RegisterResult("skipped", reason)
        recommended = evaluation.ranked(passed_only=False)[0].name
    winner = evaluation.candidate(recommended)
    # The runner-up is another model: two candidates could present the same logged model.
    runner_up = next((c for c in evaluation.ranked() if c.model_uri != winner.model_uri), None)
    chosen = [winner] + ([runner_up] if runner_up and request.challenger_alias else [])
    name = request.registered_model_name
    versions = {c.name: _version_for(client, name, c) for c in chosen}
    for candidate in chosen:
        lineage = _lineage(client, evaluation, candidate, request.evaluate_run_id, run_id)
        if unvalidated and candidate is winner:
            lineage[REGISTERED_UNVALIDATED_TAG] = "true"
        version = versions[candidate.name].version
        # A concurrent pipeline registering the same model writes the same tags on this version.
        for key, value in lineage.items():
            retry_after_insert_race(
                f"Tag {key} of {name} version {version}",
                client.set_model_version_tag,
                name,
                version,
                key,
                value,
            )
        client.update_model_version(name, version,
                                    description=_description(candidate.name, lineage))  # fmt: skip
    aliases = {request.alias: versions[winner.name].version}
    if request.challenger_alias and runner_up:
        aliases[request.challenger_alias] = versions[runner_up.name].version
    # Aliases move last, once every version they point at is READY and described. A registry
    # without aliases (Azure ML's) gets version tags that mean the same (docs/azureml.md).
    native = True
    for alias, alias_version in aliases.items():
        native = _set_alias(client, name, alias, alias_version) and native
    if request.challenger_alias and not runner_up:
        remove_alias(client, name, request.challenger_alias)
        logger.info("Removed @%s from %s if it was set: no second candidate passed the gate",
                    request.challenger_alias, name)  # fmt: skip
    version = versions[winner.name].version
    # The exact version, not the alias, which a concurrent pipeline may already have moved.
    version_uri = f"models:/{name}/{version}"
    load_back_and_answer(version_uri)
    reason = "registered without passing the gate (allow_unvalidated)" if unvalidated else (
        f"{recommended} passed the gate and was recommended"
    )  # fmt: skip
    tag = alias_tag_key(request.alias)
    where = (
        f"models:/{name}@{request.alias}" if native
        else f"{version_uri} (this registry has no aliases: version tag {tag})"
    )  # fmt: skip
    summary = f"Registered {name} version {version} ({recommended}) as @{request.alias}: {where}"
    mlflow.set_tags({
        REGISTRATION_STATUS_TAG: "registered", REGISTRATION_REASON_TAG: reason,
        REGISTERED_VERSION_TAG: version, REGISTERED_CANDIDATE_TAG: recommended,
        REGISTERED_UNVALIDATED_TAG: str(unvalidated).lower(), SUMMARY_TAG: summary,
    })  # fmt: skip
    _record_decision(
        client, run_id,
        {"status": "registered", "reason": reason, "candidate": recommended, "aliases": aliases},
        model_version=version_uri,
    )  # fmt: skip
    logger.info(summary)
    return RegisterResult("registered", reason, version, recommended)


def _set_alias(client, name: str, alias: str, version: str) -> bool:
    """`set_alias`, once more if a concurrent pipeline won the insert; True for a registry alias,
    False for the version tag standing for it."""
    outcome: list[bool] = []
    retry_after_insert_race(
        f"Alias @{alias} of {name}",
        lambda: outcome.append(set_alias(client, name, alias, version)),
    )
    return outcome[-1]


if __name__ == "__main__":
    run_command_line("register", register)

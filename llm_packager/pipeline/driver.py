"""The driver behind the ``main`` entry point: which step runs happen, with what, which are reused.

`plan_pipeline` asks each step's declaration (``llm_packager.config.specs``) for its runs: one per
step, except a runtime's log step, which runs once per candidate of that runtime (for ONNX, the
onnx section, then each of ``onnx.variants``). `run_pipeline` runs them in order through MLflow's
local project backend, each nested under main's run, with its parameters and the run ids of the
steps it follows. Before running one, it looks for a finished run with the same reuse key
(``llm_packager.pipeline.reuse``) and takes that instead. See docs/architecture.md.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import ExecutionException
from mlflow.projects.backend.loader import load_backend
from mlflow.projects.utils import (
    PROJECT_BUILD_IMAGE,
    PROJECT_DOCKER_ARGS,
    PROJECT_DOCKER_AUTH,
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    PROJECT_SYNCHRONOUS,
)
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_BACKEND
from omegaconf import DictConfig

from llm_packager.choices import ModelStore
from llm_packager.config.parameters import (
    ROLE_UPSTREAM,
    as_mlflow_parameters,
    fields_of,
    takes_many_runs,
)
from llm_packager.config.planning import PlannedStep
from llm_packager.config.specs import FETCH_MODEL, pipeline_steps, step_names, upstream_steps
from llm_packager.errors import REQUESTS_IN_TURN, TrackingServerUnreachableError, UserError
from llm_packager.keys import (
    CODE_VERSION_TAG,
    ERROR_TAG,
    LAUNCH_TIMING_TAG,
    LOCAL_LOG_TAG,
    MODEL_PARAMETER_COUNT_METRIC,
    MODEL_STORE_TAG,
    MODEL_TOTAL_BYTES_METRIC,
    REUSE_KEY_TAG,
    SUMMARY_TAG,
    upstream_tag,
)
from llm_packager.models.memory_parts import stored_bytes_per_parameter
from llm_packager.models.model_store import fail_abandoned_models, resolve_model_store
from llm_packager.pipeline.memory_budget import available_memory_mib, check_memory, step_memory
from llm_packager.pipeline.reuse import find_reusable_run, reuse_key
from llm_packager.pipeline.step_run import (
    EXIT_SERVER_UNREACHABLE,
    fail_orphaned_runs,
    log_artifact_uri,
)
from llm_packager.pipeline.watchdog import wait_watching_server
from llm_packager.project import PROJECT_DIR

ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")

logger = logging.getLogger(__name__)


class SelectionError(UserError, ValueError):
    """An unknown step name, force value or env manager."""


class StepFailedError(UserError):
    """A step run failed; the message names the step, its run and its log."""


@dataclass(frozen=True)
class StepOutcome:
    """One step run of a pipeline run, ran or reused."""

    entry_point: str
    name: str
    run_id: str
    reused: bool


def _parse_step_list(value: str, option: str, *, allow: tuple[str, ...]) -> list[str]:
    known = step_names()
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise SelectionError(f"{option}: give 'all' or a comma list of {', '.join(known)}")
    if unknown := [name for name in names if name not in known]:
        raise SelectionError(
            f"{option}: unknown step '{unknown[0]}'; known steps: "
            f"{', '.join(known)}{' (or ' + ', '.join(allow) + ')' if allow else ''}"
        )
    return names


def select_steps(steps: str) -> list[str]:
    """Steps to run, in pipeline order, from ``all`` or a comma list."""
    if steps.strip() == "all":
        return list(step_names())
    chosen = set(_parse_step_list(steps, "steps", allow=("all",)))
    return [name for name in step_names() if name in chosen]


def select_forced(force: str) -> set[str]:
    """Steps to rerun even if reusable, from ``none``, ``all`` or a comma list."""
    if force.strip() == "none":
        return set()
    if force.strip() == "all":
        return set(step_names())
    return set(_parse_step_list(force, "force", allow=("none", "all")))


def resolve_env_manager(requested: str) -> str:
    """The env manager to hand to every step.

    MLflow does not pass the driver's ``--env-manager`` on, so ``auto`` infers it from the
    environment main itself runs in: an MLflow-made conda env or virtualenv, else ``local``.
    """
    if requested != "auto":
        if requested not in ENV_MANAGERS:
            raise SelectionError(
                f"env_manager: '{requested}' is not one of auto, {', '.join(ENV_MANAGERS)}"
            )
        return requested
    if os.environ.get("CONDA_DEFAULT_ENV", "").startswith("mlflow-"):
        return "conda"
    mlflow_envs = Path(os.environ.get("MLFLOW_ENV_ROOT", Path.home() / ".mlflow" / "envs"))
    if Path(sys.prefix).resolve().is_relative_to(mlflow_envs.expanduser().resolve()):
        return "virtualenv"
    return "local"


def plan_pipeline(
    cfg: DictConfig,
    steps: list[str] | None = None,
    store: ModelStore = ModelStore.logged_models,
) -> list[PlannedStep]:
    """The step runs a config asks for, in run order, limited to the ``steps`` selected; the log
    steps put their models in ``store``."""
    return [
        planned
        for step in pipeline_steps()
        if steps is None or step.entry_point in steps
        for planned in step.plan(step, cfg, store)
    ]


def _upstream_values(planned: PlannedStep, done: list[StepOutcome]) -> dict[str, Any]:
    """The upstream fields of a step: the run ids of the steps it follows, from ``done``."""
    spec = planned.definition.parameters
    values: dict[str, Any] = {}
    for field in fields_of(spec, ROLE_UPSTREAM):
        steps = upstream_steps(field)
        runs = tuple(outcome.run_id for outcome in done if outcome.entry_point in steps)
        if not runs:
            raise StepFailedError(
                f"Step '{planned.name}' needs the run of '{' or '.join(steps)}'; add it to -P steps"
            )
        if takes_many_runs(spec, field):
            values[field.name] = runs
        elif len(runs) > 1:
            raise StepFailedError(f"Step '{planned.name}' takes one run of {steps[0]}")
        else:
            values[field.name] = runs[0]
    return values


def _launch(
    client: MlflowClient,
    planned: PlannedStep,
    parameters: dict[str, str],
    *,
    env_manager: str,
    experiment_id: str,
    silent_limit_s: float,
) -> str:
    entry_point = planned.definition.entry_point
    # MLflow's local project backend (its plugin interface) starts the step's process and returns
    # at once; main waits for it here. mlflow.projects.run(synchronous=True) would ask the server
    # for the run's status after any exit, and when the step already found the server gone, that
    # waits through every retry a second time.
    backend_config = {
        PROJECT_ENV_MANAGER: env_manager,
        PROJECT_SYNCHRONOUS: True,
        PROJECT_DOCKER_ARGS: None,
        PROJECT_STORAGE_DIR: None,
        PROJECT_BUILD_IMAGE: False,
        PROJECT_DOCKER_AUTH: None,
    }
    try:
        submitted = load_backend("local").run(
            str(PROJECT_DIR), entry_point, parameters, None, backend_config,
            mlflow.get_tracking_uri(), experiment_id,
        )  # fmt: skip
    except ExecutionException as error:
        raise StepFailedError(f"Step '{planned.name}' could not start: {error}") from error
    run_id = submitted.run_id
    # As mlflow.projects.run tags it.
    client.set_tag(run_id, MLFLOW_PROJECT_BACKEND, "local")
    try:
        exit_code = wait_watching_server(
            submitted.command_proc, mlflow.get_tracking_uri(), silent_limit_s
        )
    except KeyboardInterrupt:
        submitted.cancel()
        client.set_terminated(run_id, "KILLED")
        raise
    if exit_code is None:
        # No call to the server from here on: each would wait through MLflow's retries. The step
        # run stays RUNNING, and the next main marks it FAILED (its process is gone).
        raise TrackingServerUnreachableError(
            f"The tracking server {mlflow.get_tracking_uri()} did not answer for "
            f"{silent_limit_s:.0f} s while step '{planned.name}' (run {run_id}) was working, so "
            "main stopped it. Start the server again; a rerun reuses every step that finished"
        )
    if exit_code == EXIT_SERVER_UNREACHABLE:
        raise TrackingServerUnreachableError(
            f"Step '{planned.name}' (run {run_id}) lost the tracking server "
            f"{mlflow.get_tracking_uri()}: no answer after MLflow's retries. Start it again; a "
            "rerun reuses every step that finished"
        )
    if exit_code == 0:
        return run_id
    run = client.get_run(run_id)
    reason = run.data.tags.get(ERROR_TAG) or _how_it_ended(exit_code)
    if run.info.status == "RUNNING":
        # Ended before it could end its own run: killed by a signal (the OOM killer, say).
        client.set_tag(run_id, ERROR_TAG, reason)
        client.set_terminated(run_id, "FAILED")
    where = run.data.tags.get(LOCAL_LOG_TAG)
    log = (
        f"{where} (the server did not store it)" if where else log_artifact_uri(run_id, entry_point)
    )
    raise StepFailedError(
        f"Step '{planned.name}' failed (run {run_id}): {reason.rstrip('.')}. Its log: {log}"
    )


def _how_it_ended(exit_code: int) -> str:
    # Popen reports a signal as a negative code; a shell in between reports 128 + the signal.
    number = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
    try:
        return f"its process was killed by {signal.Signals(number).name}"
    except ValueError:
        return f"its process ended with exit code {exit_code}"


def run_pipeline(
    cfg: DictConfig,
    *,
    steps: list[str],
    forced: set[str],
    env_manager: str,
    code_version: str,
    parent_run_id: str,
    outcomes: list[StepOutcome],
) -> None:
    """Run or reuse each selected step run in order, appending each to ``outcomes`` as it ends
    (so a caller still sees how far the pipeline got when a step fails); stop at a failure.

    Raises:
        StepFailedError: naming the failed step, its run id and its log. Later steps do not start.
    """
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    fail_orphaned_runs(client, experiment_id)
    store = resolve_model_store(cfg.tracking.logged_models, client, experiment_id)
    if store == ModelStore.logged_models:
        fail_abandoned_models(client, experiment_id)
    client.set_tag(parent_run_id, MODEL_STORE_TAG, store.value)
    logger.info("Models are logged as %s", store.value)
    for planned in plan_pipeline(cfg, steps, store):
        entry_point = planned.definition.entry_point
        upstream = _upstream_values(planned, outcomes)
        values = planned.definition.parameters(**planned.values, **upstream)
        parameters = as_mlflow_parameters(values)
        upstream_runs = {
            outcome.name: outcome.run_id
            for outcome in outcomes
            if outcome.run_id in {run for ids in upstream.values() for run in _as_tuple(ids)}
        }
        key = reuse_key(entry_point, parameters, code_version, upstream_runs)
        previous = None
        if entry_point not in forced and planned.reusable:
            previous = find_reusable_run(client, experiment_id, key)
        if previous is not None:
            logger.info("%s: reusing run %s", planned.name, previous.info.run_id)
            outcomes.append(StepOutcome(entry_point, planned.name, previous.info.run_id, True))
        else:
            why = "forced" if entry_point in forced else "no reusable run"
            if not planned.reusable:
                why = "an unpinned revision may have moved, so it is fetched again"
            logger.info("%s: running (%s)", planned.name, why)
            _check_memory(cfg, client, planned, values, outcomes)
            launched = time.time()
            run_id = _launch(
                client, planned, parameters, env_manager=env_manager,
                experiment_id=experiment_id,
                # The share of the budget a step's own call would wait (llm_packager.errors): a
                # step that computes without calling the server is stopped as soon as its next
                # call would have given up.
                silent_limit_s=cfg.tracking.server_timeout_s / REQUESTS_IN_TURN,
            )  # fmt: skip
            client.set_tag(
                run_id,
                LAUNCH_TIMING_TAG,
                json.dumps({"launched": launched, "returned": time.time()}),
            )
            # Tagged only after success, so a run that failed or was cut off is never reused.
            client.set_tag(run_id, CODE_VERSION_TAG, code_version)
            for name, upstream_id in upstream_runs.items():
                client.set_tag(run_id, upstream_tag(name), upstream_id)
            client.set_tag(run_id, REUSE_KEY_TAG, key)
            outcomes.append(StepOutcome(entry_point, planned.name, run_id, False))
        if summary := client.get_run(outcomes[-1].run_id).data.tags.get(SUMMARY_TAG):
            # Said on the console, not only in a tag: e.g. that no model was registered, and why.
            logger.info("%s: %s", planned.name, summary)


def _check_memory(cfg: DictConfig, client: MlflowClient, planned: PlannedStep, values: Any,
                  outcomes: list[StepOutcome]) -> None:  # fmt: skip
    """Refuse, before it is launched, a step whose model will not fit in the memory available,
    estimated from the fetched model's parameter count (llm_packager.pipeline.memory_budget)."""
    fetch = next((o for o in outcomes if o.entry_point == FETCH_MODEL.entry_point), None)
    if not cfg.memory.refuse_if_short or fetch is None:
        return
    metrics = client.get_run(fetch.run_id).data.metrics
    if not (parameter_count := int(metrics.get(MODEL_PARAMETER_COUNT_METRIC, 0))):
        return
    stored = stored_bytes_per_parameter(metrics[MODEL_TOTAL_BYTES_METRIC], parameter_count)
    memory = step_memory(planned.definition.entry_point, values, cfg.transformers.dtype)
    available = available_memory_mib(cfg.memory.available_mib)
    check_memory(planned.name, memory, parameter_count, stored, available)


def _as_tuple(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return value if isinstance(value, tuple) else (value,)

"""The driver behind the ``main`` entry point: which steps run, with what, and which are reused.

Each selected step runs through ``mlflow.projects.run`` as its own run nested under main's run,
with flat parameters and the run ids of its upstream steps. Before running one, the driver looks
for a finished run with the same reuse key (``llm_packager.reuse``) and takes it instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import ExecutionException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from llm_packager.config import (
    evaluate_parameters,
    fetch_model_parameters,
    log_onnx_parameters,
    log_transformers_parameters,
    register_parameters,
)
from llm_packager.project import (
    PROJECT_DIR,
    load_entry_points,
    normalise_parameters,
)
from llm_packager.reuse import (
    CODE_VERSION_TAG,
    REUSE_KEY_TAG,
    UPSTREAM_TAG_PREFIX,
    find_reusable_run,
    reuse_key,
)
from llm_packager.step_run import ERROR_TAG, SUMMARY_TAG, StepError, log_artifact_uri

# When main launched a step and when the launch returned (epoch seconds); with the step's own
# timing tag this splits its wall time (benchmarks/pipeline.py).
LAUNCH_TIMING_TAG = "llm_packager.timing.launch"

# In run order. Each step lists the steps whose run ids it receives (and whose runs are part of
# its reuse key).
PIPELINE_STEPS: dict[str, tuple[str, ...]] = {
    "fetch_model": (),
    "log_transformers": ("fetch_model",),
    "log_onnx": ("fetch_model",),
    "evaluate": ("log_transformers", "log_onnx"),
    "register": ("evaluate",),
}
# Steps that run with whichever of their upstream steps were selected (at least one); the run id
# of an unselected one is passed as "".
PARTIAL_UPSTREAM_STEPS = frozenset({"evaluate"})
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")
_PARAMETER_BUILDERS: dict[str, Callable[[DictConfig], dict[str, str | int]]] = {
    "fetch_model": fetch_model_parameters,
    "log_transformers": log_transformers_parameters,
    "log_onnx": log_onnx_parameters,
    "evaluate": evaluate_parameters,
    "register": register_parameters,
}

logger = logging.getLogger(__name__)


class SelectionError(StepError, ValueError):
    """An unknown step name, force value or env manager."""


class StepFailedError(StepError):
    """A step run failed; the message names the step, its run and its log."""


@dataclass(frozen=True)
class StepOutcome:
    """One step of a pipeline run."""

    entry_point: str
    run_id: str
    reused: bool


def _parse_step_list(value: str, option: str, *, allow: tuple[str, ...]) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise SelectionError(f"{option}: give 'all' or a comma list of {', '.join(PIPELINE_STEPS)}")
    if unknown := [name for name in names if name not in PIPELINE_STEPS]:
        raise SelectionError(
            f"{option}: unknown step '{unknown[0]}'; known steps: "
            f"{', '.join(PIPELINE_STEPS)}{' (or ' + ', '.join(allow) + ')' if allow else ''}"
        )
    return names


def select_steps(steps: str) -> list[str]:
    """Steps to run, in pipeline order, from ``all`` or a comma list."""
    if steps.strip() == "all":
        return list(PIPELINE_STEPS)
    chosen = set(_parse_step_list(steps, "steps", allow=("all",)))
    return [name for name in PIPELINE_STEPS if name in chosen]


def select_forced(force: str) -> set[str]:
    """Steps to rerun even if reusable, from ``none``, ``all`` or a comma list."""
    if force.strip() == "none":
        return set()
    if force.strip() == "all":
        return set(PIPELINE_STEPS)
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


def step_parameters(entry_point: str, cfg: DictConfig) -> dict[str, str | int | float]:
    """The parameters main derives from the config for a step (upstream run ids aside)."""
    return _PARAMETER_BUILDERS[entry_point](cfg)


def _failed_child_run_id(client: MlflowClient, parent_run_id: str, entry_point: str) -> str | None:
    runs = client.search_runs(
        experiment_ids=[client.get_run(parent_run_id).info.experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
            f"and tags.`mlflow.project.entryPoint` = '{entry_point}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _launch(
    client: MlflowClient,
    entry_point: str,
    parameters: dict[str, str],
    *,
    env_manager: str,
    experiment_id: str,
    parent_run_id: str,
) -> str:
    try:
        submitted = mlflow.projects.run(
            uri=str(PROJECT_DIR),
            entry_point=entry_point,
            parameters=parameters,
            env_manager=env_manager,
            backend="local",
            experiment_id=experiment_id,
            synchronous=True,
        )
    except ExecutionException as error:
        run_id = _failed_child_run_id(client, parent_run_id, entry_point)
        if run_id is None:
            raise StepFailedError(f"Step '{entry_point}' could not start: {error}") from error
        reason = client.get_run(run_id).data.tags.get(ERROR_TAG, "see its log").rstrip(".")
        raise StepFailedError(
            f"Step '{entry_point}' failed (run {run_id}): {reason}. "
            f"Its log: {log_artifact_uri(run_id, entry_point)}"
        ) from error
    return submitted.run_id


def run_pipeline(
    cfg: DictConfig,
    *,
    steps: list[str],
    forced: set[str],
    env_manager: str,
    code_version: str,
    parent_run_id: str,
) -> list[StepOutcome]:
    """Run or reuse each selected step in order; stop at the first failure.

    Raises:
        StepFailedError: naming the failed step, its run id and its log. Later steps do not start.
    """
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    entry_points = load_entry_points()
    upstream_run_ids: dict[str, str] = {}
    outcomes: list[StepOutcome] = []
    for entry_point in steps:
        needed = PIPELINE_STEPS[entry_point]
        upstream = {name: upstream_run_ids[name] for name in needed if name in upstream_run_ids}
        missing = [name for name in needed if name not in upstream]
        if missing and (entry_point not in PARTIAL_UPSTREAM_STEPS or not upstream):
            raise StepFailedError(
                f"Step '{entry_point}' needs the run of '{missing[0]}'; add it to -P steps"
            )
        given = {
            **step_parameters(entry_point, cfg),
            **{f"{name}_run_id": upstream.get(name, "") for name in needed},
        }
        parameters = normalise_parameters(entry_points[entry_point], given)
        key = reuse_key(entry_point, parameters, code_version, upstream)
        previous = None if entry_point in forced else find_reusable_run(client, experiment_id, key)
        if previous is not None:
            logger.info("%s: reusing run %s", entry_point, previous.info.run_id)
            outcomes.append(StepOutcome(entry_point, previous.info.run_id, reused=True))
        else:
            logger.info(
                "%s: running (%s)",
                entry_point,
                "forced" if entry_point in forced else "no reusable run",
            )
            launched = time.time()
            run_id = _launch(
                client,
                entry_point,
                parameters,
                env_manager=env_manager,
                experiment_id=experiment_id,
                parent_run_id=parent_run_id,
            )
            client.set_tag(
                run_id,
                LAUNCH_TIMING_TAG,
                json.dumps({"launched": launched, "returned": time.time()}),
            )
            # Tagged only after success, so a run that failed or was cut off is never reused.
            client.set_tag(run_id, CODE_VERSION_TAG, code_version)
            for name, upstream_id in upstream.items():
                client.set_tag(run_id, UPSTREAM_TAG_PREFIX + name, upstream_id)
            client.set_tag(run_id, REUSE_KEY_TAG, key)
            outcomes.append(StepOutcome(entry_point, run_id, reused=False))
        upstream_run_ids[entry_point] = outcomes[-1].run_id
        if summary := client.get_run(outcomes[-1].run_id).data.tags.get(SUMMARY_TAG):
            # Said on the console, not only in a tag: e.g. that no model was registered, and why.
            logger.info("%s: %s", entry_point, summary)
    return outcomes

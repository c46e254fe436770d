"""Entry point ``main``: compose the config and run (or reuse) each pipeline step as a nested run.

Reads: `MainParameters` (``llm_packager/config/specs.py``, or ``--help``): the ``conf/model``
choice,
the steps to run, Hydra overrides as one string (``none`` is the same as none, for job systems
that refuse an empty string, like Azure ML), the steps to force, and the env manager for the
step runs.

Writes (on its own run):
    artifacts ``config.yaml`` (the resolved config) and ``pipeline_steps.json`` (each step run's
    run id and whether it was reused, also after a failure, as far as the pipeline got); tags
    ``llm_packager.config_hash``, ``llm_packager.steps_ran``, ``llm_packager.steps_reused``,
    ``llm_packager.env_manager``, ``llm_packager.code_version``.

The config is validated before any step run is created, and then the preflight
(``llm_packager.pipeline.preflight``) checks the tracking server, the credentials and, when
``register`` is to run, the registry target (catalog, schema, the right to write): a bad input or
a failed check ends main with one line and exit code 2. A failed step ends it with exit code 1,
naming the step, its run id and its log.
"""

from __future__ import annotations

import logging
import os
import sys

import mlflow
from omegaconf import DictConfig

from llm_packager.config.compose import ConfigError, compose_config, config_as_yaml, config_hash
from llm_packager.config.parameters import parse_arguments
from llm_packager.config.specs import MainParameters
from llm_packager.errors import bound_tracking_retries, is_server_unreachable, one_line
from llm_packager.keys import (
    CODE_VERSION_TAG,
    CONFIG_ARTIFACT,
    CONFIG_HASH_TAG,
    ENV_MANAGER_TAG,
    ERROR_TAG,
    PIPELINE_STEPS_ARTIFACT,
    STEPS_RAN_TAG,
    STEPS_REUSED_TAG,
)
from llm_packager.pipeline.driver import (
    SelectionError,
    StepOutcome,
    resolve_env_manager,
    run_pipeline,
    select_forced,
    select_steps,
)
from llm_packager.pipeline.preflight import PreflightError, preflight
from llm_packager.pipeline.step_run import exit_process, run_step
from llm_packager.project import code_version

logger = logging.getLogger(__name__)


def run_main(
    cfg: DictConfig,
    run_id: str,
    *,
    steps: list[str],
    forced: set[str],
    env_manager: str,
) -> list[StepOutcome]:
    """Log the resolved config on main's run, then run or reuse the selected steps."""
    version = code_version()
    mlflow.log_text(config_as_yaml(cfg), CONFIG_ARTIFACT)
    mlflow.set_tags(
        {
            CONFIG_HASH_TAG: config_hash(cfg),
            ENV_MANAGER_TAG: env_manager,
            CODE_VERSION_TAG: version,
        }
    )
    outcomes: list[StepOutcome] = []
    try:
        run_pipeline(
            cfg,
            steps=steps,
            forced=forced,
            env_manager=env_manager,
            code_version=version,
            parent_run_id=run_id,
            outcomes=outcomes,
        )
    except Exception as error:
        # Recorded even when a step failed: run_pipeline appends each step run as it ends, so
        # the record shows how far the pipeline got. Not when the server is gone: every call
        # would wait through MLflow's retries again.
        if not is_server_unreachable(error):
            try:
                _record_progress(outcomes)
            except Exception as recording:  # the step's failure is the one to report
                logger.error("Could not record the pipeline's progress: %s",
                             one_line(recording) or recording)  # fmt: skip
        raise
    _record_progress(outcomes)
    for outcome in outcomes:
        logger.info(
            "%-16s %s run %s",
            outcome.name,
            "reused" if outcome.reused else "ran   ",
            outcome.run_id,
        )
    return outcomes


def _record_progress(outcomes: list[StepOutcome]) -> None:
    mlflow.set_tags(
        {
            STEPS_RAN_TAG: ",".join(o.name for o in outcomes if not o.reused),
            STEPS_REUSED_TAG: ",".join(o.name for o in outcomes if o.reused),
        }
    )
    mlflow.log_dict(
        {o.name: {"run_id": o.run_id, "reused": o.reused} for o in outcomes},
        PIPELINE_STEPS_ARTIFACT,
    )


def _reject(message: str, *, tag: bool = True) -> int:
    # Under `mlflow run` main's own run exists before this code starts; tag it with the reason so
    # the failed run explains itself (not when the tracking server is what failed: the tag would
    # wait through the retries again). No step run has been created.
    if tag and (run_id := os.environ.get("MLFLOW_RUN_ID")):
        mlflow.MlflowClient().set_tag(run_id, ERROR_TAG, message)
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    arguments = parse_arguments(MainParameters, sys.argv[1:])
    try:
        overrides = "" if arguments.overrides.strip() == "none" else arguments.overrides
        config = compose_config(arguments.model, overrides)
        selected = select_steps(arguments.steps)
        forced_steps = select_forced(arguments.force)
        manager = resolve_env_manager(arguments.env_manager)
    except (ConfigError, SelectionError) as bad_input:
        sys.exit(_reject(str(bad_input)))
    if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ:
        # Bound how long any MLflow call waits for a tracking server that is gone, here and in
        # every step (they inherit the environment); a user's own setting wins.
        os.environ.update(bound_tracking_retries(config.tracking.server_timeout_s))
    # MLflow's calls to Databricks through databricks-sdk (Unity Catalog's registry) retry for
    # this long instead of MLflow's default of 500 s.
    os.environ.setdefault("MLFLOW_DATABRICKS_ENDPOINT_HTTP_RETRY_TIMEOUT",
                          str(config.tracking.server_timeout_s))  # fmt: skip
    try:
        preflight(config, selected)
    except PreflightError as refused:
        sys.exit(_reject(str(refused), tag=refused.tracking_reachable))
    exit_process(
        run_step(
            "main",
            lambda run_id: run_main(
                config, run_id, steps=selected, forced=forced_steps, env_manager=manager
            ),
        )
    )

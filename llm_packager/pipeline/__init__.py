"""Driving the pipeline: which step runs happen, which are reused, and each step run's life cycle.

Owns: planning and running the steps for `main` (`driver`), the reuse key and the outputs a step
announces (`reuse`), a step run's life cycle and command line (`step_run`), the memory
check before a step is launched (`memory_budget`), and the checks before any step run is created
(`preflight`: tracking server, credentials, registry target), the own-server Azure ML job's
launcher (`azureml_launcher`), and waiting for a step while watching the tracking server
(`watchdog`). What each step plans and loads is declared
with the step (``llm_packager.config.specs``); the driver asks, and never branches on a name.

Public names:
- driver: SelectionError, StepFailedError, PlannedStep (from config.planning), StepOutcome,
  select_steps,
  select_forced, resolve_env_manager, plan_pipeline, run_pipeline
- reuse: reuse_key, announce_outputs, announce_model, candidate_tags, announced_outputs,
  output_exists, outputs_exist, find_reusable_run
- step_run: EXIT_SERVER_UNREACHABLE, log_artifact_uri, peak_memory_mib, exit_process,
  local_log_folder, run_step, run_command_line, fail_orphaned_runs
- memory_budget: NotEnoughMemoryError, step_memory, available_memory_mib, check_memory
- preflight: PreflightError, preflight, check_tracking, check_registry
- azureml_launcher: INJECTED_VARIABLES, CREDENTIAL_VARIABLES, FETCHER_VARIABLE, SecretFetcher,
  LauncherError, key_vault_fetcher, fetcher_for, server_environment, main
- watchdog: HEALTH_POLL_S, health_url, server_answers, wait_watching_server

The top layer: it may import every other subpackage; nothing imports it but the steps.
"""

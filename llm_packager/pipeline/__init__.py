"""Driving the pipeline: which step runs happen, which are reused, and each step run's life cycle.

Owns: planning and running the steps for `main` (`driver`), the reuse key and the outputs a step
announces (`reuse`), a step run's life cycle and command line (`step_run`), and each step's
memory estimate, checked before it is launched (`memory_budget`).

Public names:
- driver: SelectionError, StepFailedError, PlannedStep, StepOutcome, select_steps,
  select_forced, resolve_env_manager, plan_pipeline, run_pipeline
- reuse: reuse_key, announce_outputs, announce_model, candidate_tags, announced_outputs,
  output_exists, outputs_exist, find_reusable_run
- step_run: EXIT_SERVER_UNREACHABLE, log_artifact_uri, peak_memory_mib, exit_process,
  local_log_folder, run_step, run_command_line, fail_orphaned_runs
- memory_budget: NotEnoughMemoryError, MemoryPart, StepMemory, step_memory,
  available_memory_mib, check_memory, stored_bytes_per_parameter

The top layer: it may import every other subpackage; nothing imports it but the steps.
"""

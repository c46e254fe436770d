"""Every parameter, step and runtime declared once, and the Hydra config and job files derived
from them.

Owns: the parameter machinery (`parameters`: codecs, parsers, MLproject entries, schema fields,
documentation rows), the declarations themselves (`specs`: each entry point's parameters, each
step's and each runtime's definition), how a step's runs are planned from the config and what
each holds in memory (`planning`), each runtime's rules for its conf/ sections
(`runtime_checks`), the typed conf/ schema (`schema`), composing and validating conf/ (`compose`;
only the `main` entry point imports it), and the Databricks and Azure ML job definitions
(`remote_jobs`: what both share; `databricks_bundle`; `azureml_jobs`).

Public names:
- parameters: Codec, enum_codec, parameter, upstream, computed, fields_of, codec_of, default_of,
  takes_many_runs, as_mlflow_parameters, argument_parser, parse_arguments, mlproject_entry_point,
  config_schema_fields, config_values, markdown_rows, parse_key_values, format_key_values
- specs: MainParameters, FetchModelParameters, GenerationParameters, LogTransformersParameters,
  LogOnnxParameters, EvaluateParameters, RegisterParameters, StepDefinition, RuntimeDefinition,
  MAIN, FETCH_MODEL, RUNTIMES, EVALUATE, REGISTER, pipeline_steps, step_names, step_named,
  runtime_named, UnknownRuntimeError, TRANSFORMERS, ONNX, upstream_steps, candidate_names,
  PIPELINE, STEP_NAMES, ENTRY_POINTS, GATE
- planning: ConfigError, PlannedStep, plan_one_run, plan_fetch, plan_evaluate, plan_candidates,
  transformers_candidates, onnx_candidates, loads_nothing, log_transformers_memory,
  log_onnx_memory
- runtime_checks: checks_nothing, check_transformers, check_onnx
- schema: SCHEMA_NAME, PIPELINE_KEYS, TrackingConfig, MemoryConfig, PIPELINE_SECTIONS
- compose: ConfigError (from planning), compose_config, validate_config, config_as_yaml,
  config_hash
- remote_jobs: main_arguments, GENERATED
- databricks_bundle: databricks_bundle
- azureml_jobs: azureml_environment, azureml_gpu_environment, azureml_job, azureml_documents

Imports the root modules, `sources`, `models` and `evaluation`.
"""

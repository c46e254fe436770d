"""Every parameter declared once, and the Hydra config and job files derived from it.

Owns: the parameter machinery (`parameters`: codecs, parsers, MLproject entries, schema fields,
documentation rows), the declarations themselves (`specs`), the typed conf/ schema (`schema`),
composing and validating conf/ (`compose`; only the `main` entry point imports it), and the
Databricks and Azure ML job definitions (`remote_jobs`).

Public names:
- parameters: Codec, parameter, upstream, computed, fields_of, codec_of, default_of,
  takes_many_runs, as_mlflow_parameters, argument_parser, parse_arguments, mlproject_entry_point,
  config_schema_fields, config_values, markdown_rows, parse_key_values, format_key_values
- specs: MainParameters, FetchModelParameters, GenerationParameters, LogTransformersParameters,
  LogOnnxParameters, EvaluateParameters, RegisterParameters, StepDefinition, MAIN, PIPELINE,
  STEP_NAMES, ENTRY_POINTS, GATE
- schema: SCHEMA_NAME, PIPELINE_KEYS, TrackingConfig, MemoryConfig, PIPELINE_SECTIONS
- compose: ConfigError, compose_config, validate_config, onnx_candidates, candidate_names,
  config_as_yaml, config_hash
- remote_jobs: databricks_bundle, azureml_environment, azureml_job, main_arguments

Imports the root modules, `sources`, `models` and `evaluation`.
"""

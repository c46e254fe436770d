"""Every tag, metric, param and artifact key the project writes, spelled once.

A run, a LoggedModel or a model version is searched, reused and explained by these keys, and more
than one step reads most of them (``main`` reuses a run by the tags a step left; ``register``
copies the tags of the log runs onto the model version), so each key is defined here and the
writers and readers import it. MLflow's own keys (``mlflow.parentRunId``,
``mlflow.source.git.commit``, ``mlflow.project.entryPoint`` ...) come from
``mlflow.utils.mlflow_tags``, never spelled here. The keys the served ONNX model reads travel with
the model (``llm_packager.serving.keys``) and are re-exported here so one module lists them all.

Values are the stored wire names: changing one orphans every run already tagged with the old one
(reuse would no longer find them), so a key is renamed only with a migration.
"""

from __future__ import annotations

# The served ONNX model's own keys: the artifact holding its ONNX folder, and its model_config.
from llm_packager.serving.keys import (  # noqa: F401 (re-exported: every key in one place)
    BATCH_WAIT_MS_KEY,
    BATCHING_KEY,
    DO_SAMPLE_KEY,
    INTRA_OP_NUM_THREADS_KEY,
    MAX_BATCH_SIZE_KEY,
    MAX_NEW_TOKENS_KEY,
    MAX_QUEUED_REQUESTS_KEY,
    MAX_TOKENS_CAP_KEY,
    MODEL_NAME_KEY,
    ONNX_ARTIFACT_KEY,
    TEMPERATURE_KEY,
    TOP_P_KEY,
)

# ----- Tags main sets on every step run it launched (llm_packager.pipeline.driver) -----
# The reuse key: a hash of entry point, parameters, code version and upstream runs, tagged once
# the step succeeded; a later main finds a run to reuse by it.
REUSE_KEY_TAG = "llm_packager.reuse_key"
# The code version (git commit, "-dirty" when edited) a run was made with; main's run has it too.
CODE_VERSION_TAG = "llm_packager.code_version"
# Followed by the upstream step run's name (``llm_packager.upstream.fetch_model``): its run id.
UPSTREAM_TAG_PREFIX = "llm_packager.upstream."
# When main launched a step and when the launch returned (epoch seconds); with the step's own
# timing tag this splits its wall time (benchmarks/pipeline.py).
LAUNCH_TIMING_TAG = "llm_packager.timing.launch"
# Where the log steps put their models (a ModelStore value), on main's run and each log run.
MODEL_STORE_TAG = "llm_packager.model_store"
# On a log run while its LoggedModel is being logged, removed once it is: a run that ended with
# it still set may have left its model PENDING (llm_packager.models.model_store).
LOGGING_MODEL_TAG = "llm_packager.logging_model"

# ----- Tags on main's own run (steps/main.py) -----
CONFIG_HASH_TAG = "llm_packager.config_hash"
ENV_MANAGER_TAG = "llm_packager.env_manager"
# Comma lists of the step run names that ran and that were reused.
STEPS_RAN_TAG = "llm_packager.steps_ran"
STEPS_REUSED_TAG = "llm_packager.steps_reused"

# ----- Tags of a step run's life cycle (llm_packager.pipeline.step_run) -----
# Why the run failed, in one line.
ERROR_TAG = "llm_packager.error"
# One line a step leaves for main to print, e.g. why a model was not registered.
SUMMARY_TAG = "llm_packager.summary"
# When the step's process started and when its own work started and finished (epoch seconds).
STEP_TIMING_TAG = "llm_packager.timing.step"
# Who runs it: a run left RUNNING by a process that is gone is found by these two.
HOST_TAG = "llm_packager.host"
PID_TAG = "llm_packager.pid"
# Where a step's log stayed (host:path) when the tracking server would not store it.
LOCAL_LOG_TAG = "llm_packager.local_log"

# ----- Tags by which a step announces what it produced (llm_packager.pipeline.reuse) -----
# JSON: output name -> URI, checked to still exist before a run is reused.
OUTPUTS_TAG = "llm_packager.outputs"
MODEL_URI_TAG = "llm_packager.model_uri"
# A log step's model as a candidate of the evaluation: its name there, and what runs it.
CANDIDATE_TAG = "llm_packager.candidate"
RUNTIME_TAG = "llm_packager.runtime"
# The output names inside OUTPUTS_TAG.
MODEL_OUTPUT = "model"
MANIFEST_OUTPUT = "manifest"
EVALUATION_OUTPUT = "evaluation"
REPORT_OUTPUT = "report"
DECISION_OUTPUT = "decision"
MODEL_VERSION_OUTPUT = "model_version"

# ----- Tags of fetch_model, copied onto the runs that log models from its weights -----
MODEL_NAME_TAG = "llm_packager.model_name"
HF_REPO_ID_TAG = "hf.repo_id"
HF_REVISION_TAG = "hf.revision"
HF_RESOLVED_COMMIT_TAG = "hf.resolved_commit"
LOCAL_DIR_TAG = "local_dir"
GGUF_FILE_TAG = "gguf.file"
GGUF_SHA256_TAG = "gguf.sha256"
GGUF_PACKAGE_TAG = "gguf.package"
SYNTHETIC_RANDOM_WEIGHTS_TAG = "synthetic.random_weights"
# Where the weights came from: copied from the fetch_model run onto each log run.
LINEAGE_TAGS = (HF_REPO_ID_TAG, HF_REVISION_TAG, HF_RESOLVED_COMMIT_TAG,
                SYNTHETIC_RANDOM_WEIGHTS_TAG)  # fmt: skip
# On a log run: the fetch_model run its weights came from.
FETCH_RUN_TAG = "llm_packager.fetch_model_run_id"

# ----- Tags and params of log_onnx -----
# A published (prebuilt) ONNX build: its repository and the commit it resolved to.
ONNX_REPO_ID_TAG = "onnx.repo_id"
ONNX_RESOLVED_COMMIT_TAG = "onnx.resolved_commit"
# On an ONNX log run from a GGUF source: "imported" (the file's own blocks) or why it re-quantized.
GGUF_BLOCKS_TAG = "llm_packager.gguf_blocks"
ONNXRUNTIME_GENAI_VERSION_PARAM = "onnxruntime_genai_version"

# ----- Tags of evaluate -----
DATASET_SHA256_TAG = "dataset_sha256"
RANDOM_WEIGHTS_TAG = "random_weights"
# The verdict: on the evaluate run as ``<candidate>.validation_status`` (candidate_key), on each
# LoggedModel as is, and on a log run whose model has no LoggedModel with the project prefix
# (run_verdict_key).
VALIDATION_STATUS_TAG = "validation_status"
VALIDATION_REASONS_TAG = "validation_reasons"
EVALUATION_RUN_ID_TAG = "evaluation_run_id"
RECOMMENDED_CANDIDATE_TAG = "recommended_candidate"
RECOMMENDED_MODEL_URI_TAG = "recommended_model_uri"
RECOMMENDATION_POLICY_TAG = "recommendation_policy"
_RUN_VERDICT_PREFIX = "llm_packager."

# ----- Tags of register, on its run -----
REGISTRATION_STATUS_TAG = "registration_status"
REGISTRATION_REASON_TAG = "registration_reason"
REGISTERED_VERSION_TAG = "registered_version"
REGISTERED_CANDIDATE_TAG = "registered_candidate"
REGISTERED_UNVALIDATED_TAG = "registered_unvalidated"

# ----- Tags register sets on each model version (its lineage) -----
# Besides these: VALIDATION_STATUS_TAG, VALIDATION_REASONS_TAG, RANDOM_WEIGHTS_TAG,
# REGISTERED_UNVALIDATED_TAG, HF_REPO_ID_TAG, HF_RESOLVED_COMMIT_TAG, and run_lineage_key and
# metric_lineage_key.
FLAVOR_TAG = "flavor"
VERSION_CANDIDATE_TAG = "candidate"
RECOMMENDED_BY_TAG = "recommended_by"
GIT_COMMIT_TAG = "git_commit"
VERSION_CODE_VERSION_TAG = "code_version"
VERSION_CONFIG_HASH_TAG = "config_hash"
_RUN_LINEAGE_PREFIX = "run."
_METRIC_LINEAGE_PREFIX = "metric."
# ----- Azure ML (issue 24): a registry without aliases (llm_packager.models.registry) -----
# ``alias.<alias>`` on the model version an alias points at, where the registry has no aliases;
# its value is when the alias moved there (epoch ms), so the newest holder wins during a move.
_ALIAS_TAG_PREFIX = "alias."

# ----- Metrics -----
# fetch_model: the fetched folder's size and its safetensors parameter count (main sizes each
# step's memory from these).
MODEL_TOTAL_BYTES_METRIC = "model_total_bytes"
MODEL_PARAMETER_COUNT_METRIC = "model_parameter_count"
# log_transformers and log_onnx.
MODEL_SIZE_BYTES_METRIC = "model_size_bytes"
ONNX_SIZE_BYTES_METRIC = "onnx_size_bytes"
LOG_SECONDS_METRIC = "log_seconds"
LOAD_SECONDS_METRIC = "load_seconds"
GREEDY_TOKEN_AGREEMENT_METRIC = "greedy_token_agreement"
# Every step: its own peak resident memory and its children's largest (MiB).
PEAK_RSS_METRIC = "peak_rss_mib"
PEAK_RSS_CHILDREN_METRIC = "peak_rss_children_mib"
# evaluate: ``<candidate>.<metric>`` (candidate_key) for each of these, which are also the names
# a gate rule may use (llm_packager.evaluation.metrics.MODEL_METRICS). Quality against the
# evaluation set's references:
EXACT_MATCH_METRIC = "exact_match"
CONTAINS_REFERENCE_METRIC = "contains_reference"
TOKEN_F1_METRIC = "token_f1"
# Agreement with the reference candidate's answers:
IDENTICAL_RATE_METRIC = "identical_rate"
TOKEN_AGREEMENT_METRIC = "token_agreement"
# Speed, memory and size, measured in the candidate's own worker process (load_seconds and
# model_size_bytes are the log steps' keys above, measured again there):
DECODE_TOKENS_PER_S_METRIC = "decode_tokens_per_s"
TTFT_S_METRIC = "ttft_s"
LATENCY_P50_S_METRIC = "latency_p50_s"
LATENCY_P95_S_METRIC = "latency_p95_s"
PEAK_RSS_LOAD_MIB_METRIC = "peak_rss_load_mib"
PEAK_RSS_GENERATE_MIB_METRIC = "peak_rss_generate_mib"
MODEL_SIZE_MIB_METRIC = "model_size_mib"
# Teacher-forced comparison with the reference over a fixed corpus
# (llm_packager.evaluation.teacher_forcing): KL(reference ‖ candidate) in nats per position (mean,
# 95th and 99th percentile), how often the most likely next token is the same, and the perplexity
# on the corpus and its ratio to the reference's.
KLD_MEAN_METRIC = "kld_mean"
KLD_P95_METRIC = "kld_p95"
KLD_P99_METRIC = "kld_p99"
TOP1_AGREEMENT_METRIC = "top1_agreement"
PERPLEXITY_METRIC = "perplexity"
PERPLEXITY_RATIO_METRIC = "perplexity_ratio"

# ----- Artifacts (paths inside a run's artifacts) -----
# main
CONFIG_ARTIFACT = "config.yaml"
PIPELINE_STEPS_ARTIFACT = "pipeline_steps.json"
# Every step: its log is LOG_ARTIFACT_DIR/<entry point>.log (step_log_artifact).
LOG_ARTIFACT_DIR = "logs"
ONNX_BUILDER_LOG = "onnx_builder.log"
# fetch_model: the model folder and its checksum manifest.
FETCHED_MODEL_DIR = "hf_model"
MANIFEST_FILE_NAME = "manifest.json"
# fetch_model from a GGUF source: the file itself, for an ONNX build to carry its blocks over.
FETCHED_GGUF_DIR = "gguf"
# The log steps: every logged chat model, in both model stores; the check request's answers.
MODEL_ARTIFACT_PATH = "chat_model"
SAMPLE_COMPLETION_ARTIFACT = "sample_completion.json"
SAMPLE_PROMPT_ANSWER_ARTIFACT = "sample_prompt_answer.json"
# The log steps: keys of a logged model's metadata (its MLmodel file): the model it was made from,
# and for ONNX its weight precision and candidate name.
SOURCE_MODEL_METADATA = "source_model"
PRECISION_METADATA = "precision"
CANDIDATE_METADATA = "candidate"
# evaluate
EVALUATION_FILE = "evaluation.json"
EVAL_TABLE_ARTIFACT = "eval_table.json"
COMPARISON_CSV = "comparison.csv"
COMPARISON_JSON = "comparison.json"
CHARTS_DIR = "charts"
QUALITY_CHART = "quality.png"
LATENCY_CHART = "latency.png"
SPEED_CHART = "speed.png"
MEMORY_CHART = "memory.png"
KL_DIVERGENCE_CHART = "kl_divergence.png"
REPORT_ARTIFACT = "report.html"
# register
REGISTRATION_ARTIFACT = "registration.json"


def candidate_key(candidate: str, key: str) -> str:
    """``<candidate>.<key>``: a candidate's metric or verdict tag on the evaluate run."""
    return f"{candidate}.{key}"


def run_verdict_key(key: str) -> str:
    """A verdict tag (VALIDATION_STATUS_TAG ...) as set on a log run whose model is run
    artifacts, with no LoggedModel to carry it."""
    return _RUN_VERDICT_PREFIX + key


def run_lineage_key(step_run: str) -> str:
    """``run.<step>``: a model version's tag holding the run id of one step of its pipeline."""
    return _RUN_LINEAGE_PREFIX + step_run


def metric_lineage_key(metric: str) -> str:
    """``metric.<name>``: a model version's tag holding one of its candidate's metrics."""
    return _METRIC_LINEAGE_PREFIX + metric


def is_metric_lineage_key(key: str) -> bool:
    """Whether a model version's tag is a metric_lineage_key."""
    return key.startswith(_METRIC_LINEAGE_PREFIX)


def metric_of_lineage_key(key: str) -> str:
    """The metric name a metric_lineage_key holds."""
    return key.removeprefix(_METRIC_LINEAGE_PREFIX)


def step_log_artifact(entry_point: str) -> str:
    """Where a step run keeps its log among its artifacts."""
    return f"{LOG_ARTIFACT_DIR}/{entry_point}.log"


def upstream_tag(step_run: str) -> str:
    """The tag holding the run id of an upstream step run (UPSTREAM_TAG_PREFIX + its name)."""
    return UPSTREAM_TAG_PREFIX + step_run


def alias_tag_key(alias: str) -> str:
    """``alias.<alias>``: the model version tag that stands for an alias where the registry has
    none (Azure ML's)."""
    return _ALIAS_TAG_PREFIX + alias

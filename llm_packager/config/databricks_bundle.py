"""The Databricks Asset Bundle (``databricks.yml``): one job that runs the ``main`` entry point on
a single-node job cluster, with targets per cloud and mode, and a GPU job (defined, never run).

docs/databricks.md gives the evidence behind each choice below; the tests in
tests/config/test_remote_jobs.py check the file against the bundle CLI's published rules.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from llm_packager.config.parameters import as_mlflow_parameters
from llm_packager.config.remote_jobs import GENERATED, main_arguments
from llm_packager.config.specs import MainParameters

DATABRICKS_BUNDLE = Path("databricks.yml")
DATABRICKS_TASK_SCRIPT = "databricks/run_step.py"
JOB = "llm_packager_pipeline"
GPU_JOB = "llm_packager_pipeline_gpu"
# DBR 15.4 LTS, the standard runtime: its Python is 3.11, the lock's (16.4 and 17.3 have 3.12).
# Not the ML runtime: its torchvision is built for its own torch, and transformers imports
# torchvision whenever it is installed. The task runs in a virtual environment of our own lock
# (databricks/run_step.py), so the runtime's numpy, pandas, pyarrow and protobuf stay as they are.
DATABRICKS_RUNTIME = "15.4.x-scala2.12"
# GPU nodes need the ML runtime's GPU image (the standard runtime has none); the task's own
# environment keeps its torch and torchvision out of ours.
DATABRICKS_GPU_RUNTIME = "15.4.x-gpu-ml-scala2.12"
# `bundle.engine` exists from CLI v0.295.0; the direct engine is generally available (and the
# default for new deployments) from v1.3.0, the version required here.
DATABRICKS_CLI_VERSION = ">= 1.3.0"
DATABRICKS_ENGINE = "direct"
# The node's local disk on every cloud: caches and the task's environment go there, not ~/.cache.
LOCAL_DISK = "/local_disk0/llm_packager"
# 32 GiB and a local SSD each: the largest step, onnx=build's model builder, peaks at 25.7 GiB for
# Phi-3-mini (docs/performance.md); the others stay under 8 GiB.
NODE_TYPES = {"aws": "m5d.2xlarge", "azure": "Standard_D8ds_v5", "gcp": "n2-highmem-4"}
# One NVIDIA GPU (A10G, T4, L4: 16-24 GB, Turing or newer as CUDA 13 needs) and 32 GiB or more.
GPU_NODE_TYPES = {"aws": "g5.2xlarge", "azure": "Standard_NC8as_T4_v3", "gcp": "g2-standard-8"}
CLOUDS = tuple(NODE_TYPES)
# The CUDA choices of docs/deployment.md's GPU section, with Microsoft's prebuilt CUDA build: the
# model builder (onnx=build-cuda) peaks at 25.7 GiB of host memory for Phi-3-mini, too close to a
# 32 GiB GPU node's total once the driver's JVM and the OS have their share.
GPU_OVERRIDES = "onnx=prebuilt-cuda transformers=cuda"


def databricks_bundle(cfg: DictConfig) -> dict[str, object]:
    """The Asset Bundle: the pipeline job, its variables, and the targets per mode and cloud."""
    return {
        "bundle": {
            "name": "llm-packager",
            "databricks_cli_version": DATABRICKS_CLI_VERSION,
            "engine": DATABRICKS_ENGINE,
        },
        "variables": _variables(cfg),
        "sync": {"exclude": ["mlruns", "mlartifacts", "mlflow.db", ".venv", "benchmarks/results"]},
        "resources": {"jobs": {JOB: _job(cfg, gpu=False)}},
        "targets": _targets(cfg),
    }


def _variables(cfg: DictConfig) -> dict[str, dict]:
    return {
        "model": {"description": "The conf/model choice to package", "default": cfg.model.name},
        "registered_model": {
            "description": "The model's name in Unity Catalog (letters, digits, _)",
            "default": str(cfg.register.registered_model_name).rsplit(".", 1)[-1],
        },
        "catalog": {"description": "Unity Catalog catalog for the model", "default": "main"},
        "schema": {"description": "Unity Catalog schema for the model", "default": "default"},
        "experiment": {
            "description": "MLflow experiment the pipeline's runs log to",
            "default": "/Shared/llm-packager",
        },
        "node_type_id": {
            "description": "The node (the *-azure and *-gcp targets set their cloud's)",
            "default": NODE_TYPES["aws"],
        },
        "gpu_node_type_id": {
            "description": "The GPU node (the gpu-azure and gpu-gcp targets set their cloud's)",
            "default": GPU_NODE_TYPES["aws"],
        },
        "wheelhouse": {
            "description": "A folder of the lock's wheels (a volume) pip looks in first, or none",
            "default": "none",
        },
        "prod_run_as": {
            "description": "Whom prod's job runs as: {user_name: ...} or "
            "{service_principal_name: <application id>}",
            "type": "complex",
            "default": {"user_name": "${workspace.current_user.userName}"},
        },
    }


def _job(cfg: DictConfig, gpu: bool) -> dict[str, object]:
    overrides = (
        "register=unity-catalog register.registered_model_name="
        "${var.catalog}.${var.schema}.${var.registered_model}"
    )
    if gpu:
        overrides = f"{GPU_OVERRIDES} {overrides}"
    values = as_mlflow_parameters(
        MainParameters(model="${var.model}", overrides=overrides, env_manager="local")
    )
    environment = ["--lock", "requirements.txt", *(["--cuda"] if gpu else [])]
    environment += ["--wheelhouse", "${var.wheelhouse}"]
    runtime, node = (
        (DATABRICKS_GPU_RUNTIME, "${var.gpu_node_type_id}")
        if gpu
        else (DATABRICKS_RUNTIME, "${var.node_type_id}")
    )
    return {
        "name": "llm-packager: ${var.model}" + (" (GPU)" if gpu else ""),
        "description": f"{GENERATED} Config: {_config_summary(cfg, gpu)}.",
        "max_concurrent_runs": 1,
        "job_clusters": [{"job_cluster_key": "pipeline", "new_cluster": _cluster(runtime, node)}],
        "tasks": [
            {
                "task_key": "main",
                "job_cluster_key": "pipeline",
                "spark_python_task": {
                    "python_file": DATABRICKS_TASK_SCRIPT,
                    "parameters": [*environment, "main", *main_arguments(values)],
                },
            }
        ],
    }


def _cluster(runtime: str, node_type: str) -> dict:
    return {
        "spark_version": runtime,
        "node_type_id": node_type,
        "num_workers": 0,
        "data_security_mode": "SINGLE_USER",
        "spark_conf": {
            "spark.databricks.cluster.profile": "singleNode",
            "spark.master": "local[*, 4]",
        },
        "custom_tags": {"ResourceClass": "SingleNode"},
        "spark_env_vars": {
            # Said, not assumed: every run and model goes to the workspace's tracking server.
            "MLFLOW_TRACKING_URI": "databricks",
            "MLFLOW_EXPERIMENT_NAME": "${var.experiment}",
            # Every cache on the node's local disk: the Hub's, pip's, ours, and the environment.
            "HF_HOME": f"{LOCAL_DISK}/huggingface",
            "PIP_CACHE_DIR": f"{LOCAL_DISK}/pip",
            "LLM_PACKAGER_CACHE": f"{LOCAL_DISK}/models",
            "LLM_PACKAGER_VENVS": f"{LOCAL_DISK}/venvs",
            # Model saves and downloads stage in the temporary folder: the local disk too, not
            # the root volume.
            "TMPDIR": f"{LOCAL_DISK}/tmp",
        },
    }


def _targets(cfg: DictConfig) -> dict[str, dict]:
    """dev (the default), prod and gpu, each per cloud: AWS plain, Azure and GCP suffixed."""
    targets: dict[str, dict] = {}
    for cloud in CLOUDS:
        suffix = "" if cloud == "aws" else f"-{cloud}"
        targets[f"dev{suffix}"] = {"mode": "development", **_on_cloud(cloud)}
        targets[f"prod{suffix}"] = {
            "mode": "production",
            # Production mode needs an explicit root path: one deployment per target.
            "workspace": {"root_path": "/Workspace/Shared/.bundle/${bundle.name}/${bundle.target}"},
            "run_as": "${var.prod_run_as}",
            **_on_cloud(cloud),
        }
    targets["dev"]["default"] = True
    for cloud in CLOUDS:
        suffix = "" if cloud == "aws" else f"-{cloud}"
        gpu = {"mode": "development"}
        if cloud != "aws":
            gpu["variables"] = {"gpu_node_type_id": GPU_NODE_TYPES[cloud]}
        gpu["resources"] = {"jobs": {GPU_JOB: _job(cfg, gpu=True)}}
        targets[f"gpu{suffix}"] = gpu
    return targets


def _on_cloud(cloud: str) -> dict[str, dict]:
    """What a target on this cloud changes: its node, and on GCP a local SSD (GCP nodes get one
    only when asked, through gcp_attributes.local_ssd_count)."""
    if cloud == "aws":
        return {}
    changes: dict[str, dict] = {"variables": {"node_type_id": NODE_TYPES[cloud]}}
    if cloud == "gcp":
        local_ssd = {"gcp_attributes": {"local_ssd_count": 1}}
        cluster = {"job_cluster_key": "pipeline", "new_cluster": local_ssd}
        changes["resources"] = {"jobs": {JOB: {"job_clusters": [cluster]}}}
    return changes


def _config_summary(cfg: DictConfig, gpu: bool) -> str:
    source, provider = cfg.onnx.source.value, cfg.onnx.execution_provider.value
    onnx = "prebuilt/cuda" if gpu else f"{source}/{provider}"
    return f"by default model={cfg.model.name}, onnx={onnx}, register to Unity Catalog"

"""The Databricks Asset Bundle (``databricks.yml``): one job that runs the ``main`` entry point."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from llm_packager.config.parameters import as_mlflow_parameters
from llm_packager.config.remote_jobs import GENERATED, main_arguments
from llm_packager.config.specs import MainParameters

DATABRICKS_BUNDLE = Path("databricks.yml")
DATABRICKS_TASK_SCRIPT = "databricks/run_step.py"
# DBR 15.4 LTS: Python 3.11, as conda.yaml and the lock. The standard runtime, not the ML one: the
# ML runtime preinstalls a torchvision built for its own torch, transformers imports torchvision
# whenever it is installed, and beside our torch 2.13 that mix fails at import. The standard
# runtime has neither, so requirements.txt is the only source of torch.
DATABRICKS_RUNTIME = "15.4.x-scala2.12"
# The bundle features this file uses (variables, job clusters, requirements libraries) and the
# direct deployment engine, which takes task parameters as they are (the Terraform engine
# panicked on empty strings: terraform-provider-databricks#2154).
DATABRICKS_CLI_VERSION = ">= 0.250.0"
# 32 GB: Phi-3-mini in fp32 for the transformers model and its agreement check, plus the ONNX one.
DATABRICKS_NODE_TYPE = "m5d.2xlarge"


def databricks_bundle(cfg: DictConfig) -> dict[str, object]:
    """The Asset Bundle: one job whose one task runs ``main`` on a single-node cluster. The model
    and where Unity Catalog keeps it are bundle variables (``--var`` at deploy time)."""
    register = (
        "register=unity-catalog register.registered_model_name="
        "${var.catalog}.${var.schema}.${var.registered_model}"
    )
    values = as_mlflow_parameters(
        MainParameters(model="${var.model}", overrides=register, env_manager="local")
    )
    return {
        "bundle": {"name": "llm-packager", "databricks_cli_version": DATABRICKS_CLI_VERSION},
        "variables": {
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
                "description": "Driver node type (AWS; e.g. Standard_D8ds_v5 on Azure)",
                "default": DATABRICKS_NODE_TYPE,
            },
        },
        "sync": {"exclude": ["mlruns", "mlartifacts", "mlflow.db", ".venv", "benchmarks/results"]},
        "resources": {
            "jobs": {
                "llm_packager_pipeline": {
                    "name": "llm-packager: ${var.model}",
                    "description": f"{GENERATED} Config: {_config_summary(cfg)}.",
                    "max_concurrent_runs": 1,
                    "job_clusters": [
                        {
                            "job_cluster_key": "pipeline",
                            "new_cluster": _single_node_cluster(DATABRICKS_RUNTIME),
                        }
                    ],
                    "tasks": [
                        {
                            "task_key": "main",
                            "job_cluster_key": "pipeline",
                            "spark_python_task": {
                                "python_file": DATABRICKS_TASK_SCRIPT,
                                "parameters": ["main", *main_arguments(values)],
                            },
                            "libraries": [
                                {"requirements": "${workspace.file_path}/requirements.txt"}
                            ],
                        }
                    ],
                }
            }
        },
        "targets": {
            "dev": {"mode": "development", "default": True},
            "prod": {"mode": "production"},
        },
    }


def _single_node_cluster(runtime: str, node_type: str = "${var.node_type_id}") -> dict:
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
        },
    }


def _config_summary(cfg: DictConfig) -> str:
    return (
        f"by default model={cfg.model.name}, onnx={cfg.onnx.source.value}/"
        f"{cfg.onnx.execution_provider.value}, register to Unity Catalog"
    )

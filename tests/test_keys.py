"""The stored keys are exactly the strings runs already carry, and no library module spells one.

A key's value is a wire format: main finds a run to reuse by ``llm_packager.reuse_key``, and
register reads the tags the log steps left. Renaming one would orphan every run stored with the
old name, so this test pins the values on purpose (the only place a test spells them).
"""

from __future__ import annotations

import ast
import re

import pytest

from llm_packager import keys
from llm_packager.project import PROJECT_DIR

WIRE_VALUES = {
    "REUSE_KEY_TAG": "llm_packager.reuse_key",
    "CODE_VERSION_TAG": "llm_packager.code_version",
    "UPSTREAM_TAG_PREFIX": "llm_packager.upstream.",
    "OUTPUTS_TAG": "llm_packager.outputs",
    "MODEL_URI_TAG": "llm_packager.model_uri",
    "CANDIDATE_TAG": "llm_packager.candidate",
    "RUNTIME_TAG": "llm_packager.runtime",
    "ERROR_TAG": "llm_packager.error",
    "HOST_TAG": "llm_packager.host",
    "PID_TAG": "llm_packager.pid",
    "FETCH_RUN_TAG": "llm_packager.fetch_model_run_id",
    "MODEL_STORE_TAG": "llm_packager.model_store",
    "MODEL_ARTIFACT_PATH": "chat_model",
    "FETCHED_MODEL_DIR": "hf_model",
    "MANIFEST_FILE_NAME": "manifest.json",
    "EVALUATION_FILE": "evaluation.json",
    "ONNX_ARTIFACT_KEY": "onnx_model",
    "MODEL_PARAMETER_COUNT_METRIC": "model_parameter_count",
    "MODEL_TOTAL_BYTES_METRIC": "model_total_bytes",
}


@pytest.mark.parametrize("name", sorted(WIRE_VALUES))
def test_a_key_reuse_or_register_reads_keeps_its_stored_value(name):
    assert getattr(keys, name) == WIRE_VALUES[name]


def test_the_patterned_keys_compose_as_stored():
    assert keys.candidate_key("onnx-int8", keys.VALIDATION_STATUS_TAG) == (
        "onnx-int8.validation_status"
    )
    assert keys.run_verdict_key(keys.VALIDATION_STATUS_TAG) == "llm_packager.validation_status"
    assert keys.upstream_tag("fetch_model") == "llm_packager.upstream.fetch_model"
    assert keys.run_lineage_key("log_onnx") == "run.log_onnx"
    assert keys.metric_of_lineage_key(keys.metric_lineage_key("token_f1")) == "token_f1"
    assert keys.step_log_artifact("evaluate") == "logs/evaluate.log"


# A project or MLflow tag spelled as a string: "llm_packager.<key>" or "mlflow.<key>". Not a
# module run with -m, nor the SQLite file of a local tracking store.
_SPELLED_KEY = re.compile(r"^(llm_packager|mlflow)\.[A-Za-z_.]+$")
_NOT_KEYS = {"llm_packager.evaluation.worker", "mlflow.db"}


def _spelled_keys(path) -> list[str]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr)
    }  # fmt: skip
    return [
        f"{path.relative_to(PROJECT_DIR)}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings and _SPELLED_KEY.match(node.value)
        and node.value not in _NOT_KEYS
    ]  # fmt: skip


def test_no_library_module_or_step_spells_a_tag_key():
    sources = [
        path
        for folder in ("llm_packager", "steps", "benchmarks")
        for path in sorted((PROJECT_DIR / folder).rglob("*.py"))
        if path != PROJECT_DIR / "llm_packager" / "keys.py"
    ]
    assert [spelled for path in sources for spelled in _spelled_keys(path)] == []


# MLflow's logging calls and where each takes a key: the position of the key argument for the
# fluent API (mlflow.set_tag(key, ...)) and for a client (client.set_tag(run_id, key, ...)), the
# keyword that may name it instead, and whether the keys come as a dict (set_tags, log_metrics).
_KEY_ARGUMENT = {
    "set_tag": (0, 1, "key", False),
    "log_metric": (0, 1, "key", False),
    "log_param": (0, 1, "key", False),
    "delete_tag": (0, 1, "key", False),
    "set_tags": (0, 1, "tags", True),
    "log_metrics": (0, 1, "metrics", True),
    "log_params": (0, 1, "params", True),
    "log_dict": (1, 2, "artifact_file", False),
    "log_text": (1, 2, "artifact_file", False),
    "log_figure": (1, 2, "artifact_file", False),
    "log_artifact": (1, 2, "artifact_path", False),
    "log_artifacts": (1, 2, "artifact_path", False),
    "set_model_version_tag": (None, 2, "key", False),
    "set_registered_model_alias": (None, 1, "alias", False),
}


def _literal_keys(path) -> list[str]:
    """Keys and artifact paths given to MLflow's logging calls as string literals."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        spec = _KEY_ARGUMENT.get(node.func.attr)
        if spec is None:
            continue
        fluent_position, client_position, keyword, as_dict = spec
        fluent = isinstance(node.func.value, ast.Name) and node.func.value.id == "mlflow"
        position = fluent_position if fluent else client_position
        arguments = [k.value for k in node.keywords if k.arg == keyword]
        if position is not None and len(node.args) > position:
            arguments.append(node.args[position])
        for argument in arguments:
            literals = (
                [key for key in argument.keys if key is not None]
                if as_dict and isinstance(argument, ast.Dict)
                else [argument]
            )
            found += [
                f"{path.relative_to(PROJECT_DIR)}:{node.lineno} {node.func.attr} {lit.value!r}"
                for lit in literals
                if isinstance(lit, ast.Constant) and isinstance(lit.value, str)
            ]
    return found


def test_no_library_module_or_step_gives_mlflow_a_literal_key():
    sources = [
        path
        for folder in ("llm_packager", "steps")
        for path in sorted((PROJECT_DIR / folder).rglob("*.py"))
        if path != PROJECT_DIR / "llm_packager" / "keys.py"
    ]
    assert [literal for path in sources for literal in _literal_keys(path)] == []


def test_a_literal_key_given_to_mlflow_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.PROJECT_DIR", tmp_path)
    planted = tmp_path / "step.py"
    planted.write_text(
        "mlflow.set_tag('llm_packager.oops', 1)\n"
        "client.log_metric(run_id, 'tokens_per_s', 2.0)\n"
        "mlflow.log_metrics({'size': 1, SIZE_METRIC: 2})\n"
        "client.log_dict(run_id, {'prompt': 'p'}, artifact_file='answers.json')\n"
        "mlflow.set_tag(KEY, 'a literal value is fine')\n"
    )
    assert _literal_keys(planted) == [
        "step.py:1 set_tag 'llm_packager.oops'",
        "step.py:2 log_metric 'tokens_per_s'",
        "step.py:3 log_metrics 'size'",
        "step.py:4 log_dict 'answers.json'",
    ]

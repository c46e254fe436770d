"""Planning step runs from the config, the code version in the reuse key, step selection."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from llm_packager.config.compose import compose_config
from llm_packager.config.parameters import ROLE_UPSTREAM, as_mlflow_parameters, fields_of
from llm_packager.config.specs import STEP_NAMES
from llm_packager.pipeline.driver import (
    SelectionError,
    plan_pipeline,
    resolve_env_manager,
    select_forced,
    select_steps,
)
from llm_packager.pipeline.reuse import reuse_key
from llm_packager.project import PROJECT_DIR, code_version


def test_the_plan_gives_every_step_run_all_its_parameters_but_upstream_run_ids():
    plan = plan_pipeline(compose_config("tiny-random-phi3", ""))
    assert [planned.name for planned in plan] == list(STEP_NAMES)
    for planned in plan:
        spec = planned.definition.parameters
        upstream = {field.name for field in fields_of(spec, ROLE_UPSTREAM)}
        assert set(planned.values) == {field.name for field in fields_of(spec)} - upstream
        run_ids = {
            name: ("run-a",) if name == "candidate_run_ids" else "run-a" for name in upstream
        }
        as_mlflow_parameters(spec(**planned.values, **run_ids))


def test_each_onnx_variant_is_a_log_onnx_run_of_its_own():
    plan = plan_pipeline(
        compose_config("tiny-random-phi3", "onnx.variants={int8:{precision:int8},b128:"
                                           "{extra_options:{block_size:128}}}"),
        ["log_onnx"],
    )  # fmt: skip
    assert [planned.name for planned in plan] == ["log_onnx", "log_onnx:int8", "log_onnx:b128"]
    assert [planned.values["candidate"] for planned in plan] == ["onnx", "onnx-int8", "onnx-b128"]
    assert [planned.values["precision"].value for planned in plan] == ["int4", "int8", "int4"]
    assert [planned.values["extra_options"]["block_size"] for planned in plan] == [
        "32", "32", "128"
    ]  # fmt: skip


def test_reuse_key_depends_on_every_input():
    base = reuse_key("fetch_model", {"a": "1"}, "v1", {})
    assert base == reuse_key("fetch_model", {"a": "1"}, "v1", {})
    assert base != reuse_key("log_onnx", {"a": "1"}, "v1", {})
    assert base != reuse_key("fetch_model", {"a": "2"}, "v1", {})
    assert base != reuse_key("fetch_model", {"a": "1"}, "v2", {})
    assert base != reuse_key("fetch_model", {"a": "1"}, "v1", {"fetch_model": "r"})


def _copy_project(destination):
    for name in ("MLproject", "conda.yaml", "requirements.txt", "steps", "llm_packager", "conf"):
        source = PROJECT_DIR / name
        if source.is_dir():
            shutil.copytree(
                source, destination / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(source, destination / name)


def _git(folder, *arguments):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder), *arguments],
        check=True,
        capture_output=True,
    )


def test_code_version_is_the_commit_when_clean_and_tells_dirty_edits_apart(tmp_path):
    _copy_project(tmp_path)
    outside_git = code_version(tmp_path)
    assert outside_git.startswith("content-")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "snapshot")
    clean = code_version(tmp_path)
    assert len(clean) == 40
    (tmp_path / "README.md").write_text("docs do not change what steps do\n")
    assert code_version(tmp_path) == clean
    step = tmp_path / "steps" / "fetch_model.py"
    step.write_text(step.read_text() + "\n# edit one\n")
    first_edit = code_version(tmp_path)
    step.write_text(step.read_text() + "# edit two\n")
    second_edit = code_version(tmp_path)
    assert first_edit.startswith(clean + "-dirty-")
    assert second_edit.startswith(clean + "-dirty-")
    assert first_edit != second_edit


def test_step_selection_and_force():
    assert select_steps("all") == list(STEP_NAMES)
    assert select_steps("log_onnx, fetch_model") == ["fetch_model", "log_onnx"]
    assert select_forced("none") == set()
    assert select_forced("all") == set(STEP_NAMES)
    with pytest.raises(
        SelectionError, match=r"^steps: unknown step 'fetch'; known steps: fetch_model"
    ):
        select_steps("fetch")
    with pytest.raises(SelectionError, match=r"^force: unknown step 'everything'"):
        select_forced("everything")


def test_env_manager_is_inferred_or_validated(monkeypatch):
    monkeypatch.delenv("CONDA_DEFAULT_ENV", raising=False)
    assert resolve_env_manager("auto") == "local"
    monkeypatch.setenv("CONDA_DEFAULT_ENV", "mlflow-0123abcd")
    assert resolve_env_manager("auto") == "conda"
    assert resolve_env_manager("virtualenv") == "virtualenv"
    with pytest.raises(SelectionError, match=r"^env_manager: 'docker' is not one of auto, local"):
        resolve_env_manager("docker")

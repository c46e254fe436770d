"""MLproject parameters, their normalisation, and the code version in the reuse key."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from llm_packager.config import compose_config
from llm_packager.pipeline import (
    PIPELINE_STEPS,
    SelectionError,
    resolve_env_manager,
    select_forced,
    select_steps,
    step_parameters,
)
from llm_packager.project import (
    PROJECT_DIR,
    ParameterError,
    ParameterSpec,
    code_version,
    load_entry_points,
    normalise_parameters,
)
from llm_packager.reuse import reuse_key

SPECS = {
    "layers": ParameterSpec("layers", "int", 2),
    "rate": ParameterSpec("rate", "float", 0.5),
    "name": ParameterSpec("name", "string", "x"),
}


def test_int_given_as_text_or_number_normalises_the_same():
    assert (
        normalise_parameters(SPECS, {"layers": "03"})
        == normalise_parameters(SPECS, {"layers": 3})
        == {"layers": "3", "rate": "0.5", "name": "x"}
    )


def test_float_forms_normalise_the_same():
    assert normalise_parameters(SPECS, {"rate": "1"}) == normalise_parameters(SPECS, {"rate": 1.0})


def test_defaults_are_filled_in():
    assert normalise_parameters(SPECS, {}) == {"layers": "2", "rate": "0.5", "name": "x"}


def test_bad_parameters_are_named():
    with pytest.raises(ParameterError, match=r"^parameter 'layers' must be int, got 'three'$"):
        normalise_parameters(SPECS, {"layers": "three"})
    with pytest.raises(ParameterError, match=r"^unknown parameter"):
        normalise_parameters(SPECS, {"colour": "red"})
    with pytest.raises(ParameterError, match=r"^parameter 'needed' is required$"):
        normalise_parameters({"needed": ParameterSpec("needed", "string", None)}, {})


def test_mlproject_has_no_path_parameters():
    for parameters in load_entry_points().values():
        assert all(spec.type in {"string", "int", "float"} for spec in parameters.values())


def test_main_passes_every_step_exactly_its_mlproject_parameters():
    entry_points = load_entry_points()
    cfg = compose_config("tiny-random-phi3", "")
    assert set(entry_points) == {"main", *PIPELINE_STEPS}
    for step, upstream in PIPELINE_STEPS.items():
        given = set(step_parameters(step, cfg)) | {f"{name}_run_id" for name in upstream}
        assert given == set(entry_points[step]), step


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
    assert select_steps("all") == list(PIPELINE_STEPS)
    assert select_steps("log_onnx, fetch_model") == ["fetch_model", "log_onnx"]
    assert select_forced("none") == set()
    assert select_forced("all") == set(PIPELINE_STEPS)
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

"""conda.yaml and the pip lock (requirements.txt) must pin the same versions."""

from __future__ import annotations

import re
import sys

import yaml

from llm_packager.project import PROJECT_DIR

REQUIRED = {"mlflow", "transformers", "torch", "onnxruntime-genai", "numpy", "pandas",
            "hydra-core", "pytest"}  # fmt: skip


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        assert separator, f"not pinned with ==: {line}"
        pins[_canonical(name)] = version.strip()
    return pins


def _conda() -> dict:
    return yaml.safe_load((PROJECT_DIR / "conda.yaml").read_text())


def _conda_pip_pins() -> dict[str, str]:
    pip_section = next(item for item in _conda()["dependencies"] if isinstance(item, dict))
    return _pins(pip_section["pip"])


def _lock_pins() -> dict[str, str]:
    return _pins((PROJECT_DIR / "requirements.txt").read_text().splitlines())


def test_every_conda_pin_matches_the_lock():
    lock = _lock_pins()
    mismatched = {
        name: (version, lock.get(name))
        for name, version in _conda_pip_pins().items()
        if lock.get(name) != version
    }
    assert mismatched == {}


def test_required_packages_are_pinned_in_both():
    assert set(_conda_pip_pins()) >= REQUIRED
    assert set(_lock_pins()) >= REQUIRED


def test_python_version_agrees_with_the_running_interpreter():
    conda_python = next(
        item
        for item in _conda()["dependencies"]
        if isinstance(item, str) and item.startswith("python")
    )
    assert conda_python == f"python={sys.version_info.major}.{sys.version_info.minor}"


def test_torch_is_pinned_exactly_so_no_cuda_build_is_pulled():
    assert _lock_pins()["torch"] == "2.13.0"

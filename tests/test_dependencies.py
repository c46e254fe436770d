"""conda.yaml and the pip locks: what running the pipeline needs, pinned once and in agreement."""

from __future__ import annotations

import re
import sys

import yaml

from llm_packager.project import PROJECT_DIR

# What running the pipeline imports; the test tools are pinned in the dev lock only.
RUNTIME = {"mlflow", "transformers", "torch", "onnxruntime-genai", "numpy", "pandas", "hydra-core"}
TEST_TOOLS = {"pytest", "pytest-xdist", "ruff", "azure-ai-ml", "databricks-bundles", "openai"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-r "):
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


def _lock_pins(name: str = "requirements.txt") -> dict[str, str]:
    return _pins((PROJECT_DIR / name).read_text().splitlines())


def test_every_conda_pin_matches_the_lock():
    lock = _lock_pins()
    mismatched = {
        name: (version, lock.get(name))
        for name, version in _conda_pip_pins().items()
        if lock.get(name) != version
    }
    assert mismatched == {}


def test_the_runtime_packages_are_pinned_in_both_and_the_test_tools_in_neither():
    assert set(_conda_pip_pins()) >= RUNTIME
    assert set(_lock_pins()) >= RUNTIME
    assert not TEST_TOOLS & (set(_conda_pip_pins()) | set(_lock_pins()))


def test_the_dev_lock_adds_the_test_tools_to_the_runtime_lock_without_repinning_it():
    text = (PROJECT_DIR / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in text.splitlines()
    dev = _lock_pins("requirements-dev.txt")
    assert set(dev) >= TEST_TOOLS
    assert not set(dev) & set(_lock_pins())


def test_python_version_agrees_with_the_running_interpreter():
    conda_python = next(
        item
        for item in _conda()["dependencies"]
        if isinstance(item, str) and item.startswith("python")
    )
    assert conda_python == f"python={sys.version_info.major}.{sys.version_info.minor}"


def test_torch_is_pinned_exactly_so_no_cuda_build_is_pulled():
    assert _lock_pins()["torch"] == "2.13.0"

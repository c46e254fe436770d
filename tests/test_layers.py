"""Layers: no import climbs back up, steps use public names, folders say what they own.

The layers, lowest first, are written out in docs/architecture.md ("The map"). These tests read the
source with `ast`, so an import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llm_packager.project import PROJECT_DIR

PACKAGE_DIR = PROJECT_DIR / "llm_packager"
# Lowest first. A module may import from its own layer or a lower one. `serving` is the served
# ONNX model's own code, logged with every ONNX model: it must import nothing of this package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("serving",),
    ("errors", "choices", "project", "third_party", "keys"),
    ("sources",),
    ("models",),
    ("evaluation",),
    ("config",),
    ("pipeline",),
    ("generate",),
    # The OpenAI endpoint serves a registered model; nothing in the package imports it.
    ("endpoint",),
)
LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """The first component below `llm_packager` of a dotted module name."""
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every `llm_packager` import in a file: (line, module, names imported from it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "llm_packager":
                for alias in node.names:
                    found.append((node.lineno, f"llm_packager.{alias.name}", []))
            elif node.module.startswith("llm_packager."):
                found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llm_packager."):
                    found.append((node.lineno, alias.name, []))
    return found


def _package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def _own_part(path: Path) -> str:
    relative = path.relative_to(PACKAGE_DIR)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def climbing_imports(paths: list[Path]) -> list[str]:
    """The imports in `paths` that reach a higher layer than the importing module's own."""
    problems = []
    for path in paths:
        own = _own_part(path)
        if own == "__init__":
            continue
        for line, module, _ in _imports(path):
            target = _part(module)
            if target not in LAYER_OF:
                where = f"{path.relative_to(PROJECT_DIR)}:{line}"
                problems.append(f"{where} imports {module}: no layer")
            elif own not in LAYER_OF:
                problems.append(f"{path.relative_to(PROJECT_DIR)}: module has no layer")
            elif LAYER_OF[target] > LAYER_OF[own]:
                problems.append(f"{path.relative_to(PROJECT_DIR)}:{line} climbs up to {module}")
    return problems


def test_every_module_has_a_layer_and_no_import_climbs_back_up():
    assert climbing_imports(_package_modules()) == []


def test_the_serving_code_imports_nothing_of_the_package():
    serving = [p for p in _package_modules() if _own_part(p) == "serving"]
    assert serving, "llm_packager/serving/ holds the served model's code"
    assert [
        f"{p.relative_to(PROJECT_DIR)}:{line} {module}"
        for p in serving
        for line, module, _ in _imports(p)
    ] == []


def test_a_climbing_import_is_caught(tmp_path, monkeypatch):
    """The check itself can fail: a sources module that imports the pipeline is named."""
    fake_package = tmp_path / "llm_packager"
    (fake_package / "sources").mkdir(parents=True)
    planted = fake_package / "sources" / "planted.py"
    planted.write_text("def f():\n    from llm_packager.pipeline.driver import run_pipeline\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE_DIR", fake_package)
    monkeypatch.setattr(f"{__name__}.PROJECT_DIR", tmp_path)
    assert climbing_imports([planted]) == [
        "llm_packager/sources/planted.py:2 climbs up to llm_packager.pipeline.driver"
    ]


def private_imports(paths: list[Path]) -> list[str]:
    """Names with a leading underscore that `paths` import from the package."""
    return [
        f"{path.relative_to(PROJECT_DIR)}:{line} {module}.{name}"
        for path in paths
        for line, module, names in _imports(path)
        for name in names
        if name.startswith("_")
    ] + [
        f"{path.relative_to(PROJECT_DIR)}:{line} {module}"
        for path in paths
        for line, module, _ in _imports(path)
        if any(part.startswith("_") and part != "__init__" for part in module.split("."))
    ]


def test_steps_import_public_names_only():
    steps = sorted((PROJECT_DIR / "steps").glob("*.py"))
    assert steps
    assert private_imports(steps) == []


def test_a_private_import_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.PROJECT_DIR", tmp_path)
    planted = tmp_path / "step.py"
    planted.write_text("from llm_packager.pipeline.driver import _launch, plan_pipeline\n")
    assert private_imports([planted]) == ["step.py:1 llm_packager.pipeline.driver._launch"]


def _public_names(module: Path) -> list[str]:
    names = []
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
    return [name for name in names if not name.startswith("_")]


SUBPACKAGES = sorted(
    p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py") if "__pycache__" not in p.parts
)


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_subpackage_says_what_it_owns_and_lists_its_public_functions_and_classes(subpackage):
    folder = PACKAGE_DIR / subpackage
    docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    assert "Owns" in docstring, f"{subpackage}/__init__.py: say what the folder owns"
    missing = [
        f"{module.stem}.{name}"
        for module in sorted(folder.glob("*.py"))
        if module.name != "__init__.py"
        for name in _public_names(module)
        if name not in docstring
    ]
    unlisted_modules = [
        module.stem
        for module in sorted(folder.glob("*.py"))
        if module.name != "__init__.py" and f"{module.stem}:" not in docstring
    ]
    assert missing == [] and unlisted_modules == [], (
        f"llm_packager/{subpackage}/__init__.py does not list {missing + unlisted_modules}"
    )

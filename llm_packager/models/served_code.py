"""The code an ONNX model is logged with: its models-from-code file and the serving package.

``mlflow.pyfunc.log_model(python_model=MODEL_CODE, code_paths=...)`` stores the file at the
model's root and copies each ``code_paths`` entry, under its own name, into the model's ``code/``
folder, which MLflow puts first on ``sys.path`` when it loads the model. ``llm_packager/serving``
is logged as the top-level package ``llm_packager_serving``: a distinctive name, so that it cannot
clash with another package called ``serving``, and one the project never imports, so that a loaded
model always runs the copy logged with it (the model file imports that name).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_packager.project import PROJECT_DIR

MODEL_CODE = PROJECT_DIR / "llm_packager" / "models" / "onnx_chat_model.py"
SERVING_SOURCE = PROJECT_DIR / "llm_packager" / "serving"
SERVED_PACKAGE = "llm_packager_serving"


def _forget_served_package() -> None:
    """Drop any imported ``llm_packager_serving`` modules, so that the next import reads them
    again from wherever ``sys.path`` finds the package first."""
    for name in list(sys.modules):
        if name == SERVED_PACKAGE or name.startswith(f"{SERVED_PACKAGE}."):
            del sys.modules[name]


@contextmanager
def served_code_paths(source: Path = SERVING_SOURCE) -> Iterator[list[str]]:
    """The ``code_paths`` to log the ONNX model with: a copy of ``source`` (``llm_packager/serving``
    unless a benchmark compares another version) named ``llm_packager_serving``, in a folder that
    lives as long as this context.

    While the context lasts, that folder is also on ``sys.path``: MLflow runs the model file when
    it logs it (to find its ``set_model``), before it copies ``code_paths``, and the file imports
    the package. On leaving, the folder leaves ``sys.path`` and the package ``sys.modules``, so that
    nothing in this process still runs the staged copy.
    """
    with tempfile.TemporaryDirectory(prefix="served-code-") as scratch:
        staged = Path(scratch) / SERVED_PACKAGE
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        sys.path.insert(0, scratch)
        try:
            yield [str(staged)]
        finally:
            sys.path.remove(scratch)
            _forget_served_package()

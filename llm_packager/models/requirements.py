"""Pinned pip requirements for logged models, taken from the environment that logs them.

Explicit pins stop MLflow from inferring requirements, which imports torchvision (not installable
on CPU-only machines here) and pins whatever happens to be installed.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def pinned(*requirements: str) -> list[str]:
    """``name==version`` (extras kept, as in ``name[extra]==version``) for each installed
    distribution.

    A local version label (``2.13.0+cpu``) is dropped: the package index serves only the public
    version, and the label only names the build of this machine's wheel.

    Raises:
        PackageNotFoundError: a distribution is not installed, naming it.
    """
    pins = []
    for requirement in requirements:
        distribution = requirement.split("[", 1)[0]
        try:
            installed = version(distribution)
        except PackageNotFoundError as error:
            raise PackageNotFoundError(f"{distribution} is not installed") from error
        pins.append(f"{requirement}=={installed.split('+', 1)[0]}")
    return pins

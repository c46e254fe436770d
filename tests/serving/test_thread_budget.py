"""The decoders' thread count: the cores this process may use, capped by OMP_NUM_THREADS (the
variable torch reads), so one setting bounds torch and onnxruntime alike; and the test suite's
own use of it, a share of the cores for each xdist worker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llm_packager.project import PROJECT_DIR
from llm_packager.serving.decode_loop import usable_cores
from tests.support import worker_thread_budget

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("1", 1),
        (" 1 ", 1),
        ("1,4", 1),  # OpenMP's per-level list: the outer level's count
        ("100000", AFFINITY),  # never more threads than cores to run them
        ("0", AFFINITY),
        ("-2", AFFINITY),
        ("many", AFFINITY),
        ("", AFFINITY),
    ],
)
def test_omp_num_threads_caps_the_cores_the_decoders_use(monkeypatch, budget, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", budget)
    assert usable_cores() == expected


def test_without_omp_num_threads_every_core_of_the_affinity_is_used(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert usable_cores() == AFFINITY


# ----- The test suite's own budget: each xdist worker takes its share of the cores -----

PROBE = """
import os
from pathlib import Path


def test_probe():
    folder = Path(os.environ["THREAD_PROBE_OUT"])
    (folder / os.environ["PYTEST_XDIST_WORKER"]).write_text(os.environ.get("OMP_NUM_THREADS", "-"))
"""


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2"}, max(1, AFFINITY // 2)),
        ({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "64"}, 1),
        # The controller sets nothing: its workers inherit its environment.
        ({"PYTEST_XDIST_WORKER_COUNT": "2"}, None),
        ({}, None),
        # A budget the caller gave is theirs.
        ({"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2", "OMP_NUM_THREADS": "3"},
         None),
    ],
)  # fmt: skip
def test_a_test_worker_takes_its_share_of_the_cores(environ, expected):
    budget = worker_thread_budget(environ)
    assert budget == (None if expected is None else str(expected))


def test_the_workers_of_an_xdist_run_inherit_no_budget_from_their_controller(tmp_path):
    """The README's `-n 2` run, on a probe test: the worker that runs it has its share of the
    cores, not the whole machine's count that a budget set in the controller would hand down."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    environment = {
        name: value for name, value in os.environ.items()
        if name != "OMP_NUM_THREADS" and not name.startswith("PYTEST_XDIST")
    }  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-n", "2", "-q",
         "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
        cwd=PROJECT_DIR, env={**environment, "THREAD_PROBE_OUT": str(out)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (seen,) = [path.read_text() for path in out.iterdir()]
    assert seen == str(max(1, AFFINITY // 2))

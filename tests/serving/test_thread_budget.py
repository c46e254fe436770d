"""The decoders' thread count: the cores this process may use, capped by OMP_NUM_THREADS (the
variable torch reads), so one setting bounds torch and onnxruntime alike."""

from __future__ import annotations

import os

import pytest

from llm_packager.serving.decode_loop import usable_cores

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

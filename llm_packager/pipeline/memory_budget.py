"""Whether a step's model fits in this machine's memory, decided before the step loads it.

An OOM kill loses the step's work and explains nothing, so `main` estimates each step's peak
memory from the fetched model's parameter count before launching it, and refuses in one line
when the machine does not have it. What each step holds at its peak, as measured parts of the
weights, is in ``llm_packager.models.memory_parts``; which parts a step loads is in its
declaration. See docs/performance.md, "Memory and disk each step needs for Phi-3-mini".
"""

from __future__ import annotations

from pathlib import Path

from llm_packager.choices import TorchDtype
from llm_packager.config.specs import step_named
from llm_packager.errors import UserError
from llm_packager.models.memory_parts import MIB, StepMemory


class NotEnoughMemoryError(UserError, MemoryError):
    """A step would need more memory than the machine has available."""


def step_memory(entry_point: str, values: object, transformers_dtype: TorchDtype) -> StepMemory:
    """The parts a step run with parameter ``values`` loads, one process at a time, as its
    declaration says (``llm_packager.config.specs``: a runtime's log step, evaluate and register
    name theirs; fetch_model loads no model)."""
    return step_named(entry_point).memory(values, transformers_dtype)


def available_memory_mib(pretend_mib: int = 0) -> float:
    """Memory this process can still use: the kernel's MemAvailable, or less when a cgroup
    (a container, a job scheduler) sets a lower limit. ``pretend_mib`` > 0 replaces the
    measurement (``memory.available_mib``: for tests, and for limits this cannot see)."""
    if pretend_mib > 0:
        return float(pretend_mib)
    available = float("inf")
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) / 1024
    cgroup = Path("/sys/fs/cgroup")
    limit, usage = cgroup / "memory.max", cgroup / "memory.current"
    if limit.is_file() and usage.is_file() and limit.read_text().strip() != "max":
        left = (int(limit.read_text()) - int(usage.read_text())) / MIB
        available = min(available, left)
    if available == float("inf"):  # not Linux: psutil knows
        import psutil

        available = psutil.virtual_memory().available / MIB
    return available


def check_memory(step: str, memory: StepMemory, parameter_count: int, stored_bytes: int,
                 available_mib: float) -> None:  # fmt: skip
    """Refuse a step whose estimated peak exceeds ``available_mib``, in one line.

    Raises:
        NotEnoughMemoryError: naming the step, the part that does not fit, both figures, and
            the cheapest fix.
    """
    largest = memory.largest(parameter_count, stored_bytes)
    if largest is None or largest[1] <= available_mib:
        return
    part, need = largest
    raise NotEnoughMemoryError(
        f"{step} would need about {need / 1024:.1f} GiB for {part.what} of a "
        f"{parameter_count / 1e9:.2f} B-parameter model, but {available_mib / 1024:.1f} GiB is "
        f"available. Cheapest fix: {part.fix}, or a machine with more memory; "
        "overrides=memory.refuse_if_short=false goes on anyway"
    )

"""A memory budget for running compiled models: how many images one session run may take.

A compiled model's peak memory grows with the images of a run, and much faster than its forward
pass: Integrated Gradients and SmoothGrad run every image ``steps``/``samples`` times inside the
graph, ``--smooth S`` multiplies that by S, ``--top-k K`` by K. A batch size chosen for the
forward pass (``--smooth 8 --batch-size 50`` on a VGG-16: 400 copies of every activation at once)
can exhaust the machine. So the budget is measured, not guessed, once per model: with the session
loaded, one run of one image and one run of two images, each under the process's high-water mark
of resident memory (Linux: ``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs``; elsewhere the resident size after the run, which ONNX Runtime's arena
keeps at its peak). The cost of a run of ``b`` images is then modelled as

    fixed + b · per_image,   per_image = peak(2) − peak(1),   fixed = peak(1) − resident − per_image

above the resident memory before the runs (the model, its session, Python), and a run takes the
largest ``b`` with ``resident + fixed + b · per_image ≤ budget``. ``--max-memory`` sets the
budget; the default is ``DEFAULT_FRACTION`` of the memory available when the model is loaded.
A budget that cannot hold one image is refused with what it would need.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CompileError

#: Share of the available memory (``MemAvailable``) a run may use by default: the rest is left to
#: the operating system's caches, other processes and the measurement's own error.
DEFAULT_FRACTION = 0.5

#: Headroom on the measured cost of a run: a run of 16 images of a small VGG peaked 2.5% above the
#: line through the runs of 1 and 2 (``tests/test_memory.py`` checks the model at 8 images).
MARGIN = 1.15

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


class BudgetError(CompileError):
    """A budget that cannot be parsed, or that cannot hold one image: the message says how much is needed."""


def parse_memory(text: str | int | float) -> int:
    """``"8G"``, ``"8GiB"``, ``"512M"``, ``"2.5GB"`` or a number of bytes → bytes (``K``/``M``/``G``/``T``
    alone are binary units, ``KB``/``MB``/``GB``/``TB`` decimal)."""
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise BudgetError(f"--max-memory {text}: expected a size such as 8G, 512M or 2.5GB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BudgetError(f"--max-memory {text}: must be positive")
    return value


def format_bytes(count: float) -> str:
    """``1.5 GiB``, ``340 MiB``: what the error messages and the benchmark print."""
    return f"{count / 2**30:.2f} GiB" if abs(count) >= 2**30 else f"{count / 2**20:.0f} MiB"


def available_memory() -> int:
    """Bytes the system can give without swapping: ``MemAvailable`` (Linux), psutil's ``available``
    elsewhere (if installed), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(share: float = 1.0) -> int:
    """``DEFAULT_FRACTION`` of the memory available now (times ``share``: a Ray worker's part, one
    of ``workers``), plus what this process already holds (the budget bounds the process's peak,
    and what it holds is not counted as available)."""
    return int(DEFAULT_FRACTION * share * available_memory()) + resident_memory()


def resident_memory() -> int:
    """This process's resident memory in bytes."""
    status = _status()
    if "VmRSS" in status:
        return status["VmRSS"]
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if os.uname().sysname == "Darwin" else 1024)


def _status() -> dict[str, int]:
    try:
        with open("/proc/self/status") as status:
            return {key: int(value.split()[0]) * 1024 for key, _, value in (line.partition(":") for line in status)
                    if key in ("VmRSS", "VmHWM")}
    except OSError:
        return {}


def _reset_peak() -> bool:
    """Reset the high-water mark of resident memory to the current value (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def peak_during(run: Callable[[], object]) -> int:
    """The process's peak resident bytes while ``run()`` ran (or its resident size after, where the
    high-water mark cannot be reset)."""
    exact = _reset_peak()
    run()
    status = _status()
    return status["VmHWM"] if exact and "VmHWM" in status else resident_memory()


@dataclass(frozen=True)
class RunCost:
    """A model's measured memory per run: ``resident`` before the runs, then ``fixed + b · per_image``."""

    resident: int
    fixed: int
    per_image: int

    def peak(self, images: int) -> int:
        """The peak of a run of ``images`` images, with the ``MARGIN`` the sizing keeps."""
        return self.resident + int(MARGIN * (self.fixed + images * self.per_image))

    def images_within(self, budget: int, wanted: int) -> int:
        """The most images (up to ``wanted``) a run may take within ``budget``; 0 if not even one."""
        room = (budget - self.resident) / MARGIN - self.fixed
        return int(max(0, min(wanted, room // max(1, self.per_image))))


def measure(run: Callable[[int], object], budget: int) -> RunCost:
    """The cost of runs of ``run(b)`` (a session run of ``b`` images), from a run of 1 and one of 2.

    The second run is skipped where the first shows it would not fit the budget; the cost of one
    image then counts as all per-image (the larger estimate).
    """
    resident = resident_memory()
    if resident >= budget:
        raise BudgetError(f"--max-memory {format_bytes(budget)} is too small: the loaded model alone holds "
                          f"{format_bytes(resident)}; raise --max-memory above that")
    first = max(peak_during(lambda: run(1)) - resident, 0)
    if resident + 2 * first > budget:
        return RunCost(resident, 0, max(first, 1))
    second = max(peak_during(lambda: run(2)) - resident, first)
    per_image = max(second - first, 1)
    return RunCost(resident, max(first - per_image, 0), per_image)


def check_fits(cost: RunCost, budget: int, what: str = "the model") -> None:
    """Refuse a budget that cannot hold a run of one image, saying how much one needs."""
    if cost.images_within(budget, 1) < 1:
        raise BudgetError(f"--max-memory {format_bytes(budget)} is too small for {what}: one image needs "
                          f"{format_bytes(cost.peak(1))} ({format_bytes(cost.resident)} loaded, "
                          f"{format_bytes(cost.peak(1) - cost.resident)} for the run, {MARGIN - 1:.0%} margin included); raise --max-memory to at "
                          f"least {format_bytes(cost.peak(1))}")

"""How many threads the demo should use: the CPUs this process may actually run on.

``os.cpu_count()`` counts the machine's CPUs, not the ones a container or ``taskset`` grants.
OpenMP teams larger than the CPUs available spin against each other (on a 2-core machine
with one other busy process, 2 threads ran 2.6x slower than on a quiet machine, 1 thread 1.3x),
so the count is the smaller of the affinity mask and the cgroup CPU quota, less the CPUs that
other processes already keep busy (the 1-minute load average, read before the demo computes
anything): on this 2-core machine with a load average of about 13, a training step of the
default model took 0.62 s on 1 thread and 5.67 s on 2 (medians, interleaved).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``quota / period``), or ``None`` when
    there is none (``max``) or it cannot be read. Reads cgroup v2 ``cpu.max``, then cgroup v1
    ``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> tuple[int, str]:
    """The number of CPUs this process may use and how it was found (for the log line)."""
    if hasattr(os, "sched_getaffinity"):
        cpus, why = len(os.sched_getaffinity(0)), "CPU affinity"
    else:
        cpus, why = os.cpu_count() or 1, "CPU count"
    limit = cgroup_cpu_limit()
    # floor, not ceil: a team larger than the quota is throttled and spins (1.5 CPUs -> 1)
    if limit is not None and max(1, math.floor(limit)) < cpus:
        cpus, why = max(1, math.floor(limit)), f"cgroup CPU quota {limit:g}"
    return max(1, cpus), why


def plural(count: int, noun: str) -> str:
    """``"1 thread"``, ``"2 threads"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def idle_cpus(cpus: int) -> tuple[int, float | None]:
    """How many of ``cpus`` other processes leave free (``cpus`` minus the 1-minute load
    average, rounded, at least 1), and the load average (``None`` where it is unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus, None
    return max(1, min(cpus, round(cpus - load))), load


def default_threads() -> tuple[int, str]:
    """The demo's thread count and why (for the log line)."""
    cpus, why = available_cpus()
    threads, load = idle_cpus(cpus)
    reason = f"{plural(cpus, 'CPU')} usable ({why})"
    if threads < cpus:
        reason += f", the load average {load:.1f} keeps {cpus - threads} busy"
    return threads, reason

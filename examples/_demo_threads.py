"""How many threads the demo should use: the CPUs this process may actually run on.

``os.cpu_count()`` counts the machine's CPUs, not the ones a container or ``taskset`` grants.
OpenMP teams larger than the CPUs available spin against each other (on a 2-core machine
with one other busy process, 2 threads ran 2.6x slower than on a quiet machine, 1 thread 1.3x),
so the count is the smaller of the affinity mask and the cgroup CPU quota, less the CPUs that
other processes keep busy right now (measured over half a second from ``/proc/stat`` before the
demo computes anything; the 1-minute load average where ``/proc/stat`` cannot be read). On a
2-core machine with a load average of about 13, a training step of the default model took
0.62 s on 1 thread and 5.67 s on 2 (medians, interleaved). The load average is a poor guide on
its own: it decays over minutes, so right after a build on an idle machine it still reads
about 1.0 and would halve the threads.
"""

from __future__ import annotations

import math
import os
import time
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


def cpu_times(stat: Path = Path("/proc/stat")) -> dict[int, tuple[int, int]]:
    """``cpu index -> (busy, total)`` jiffies since boot, from ``/proc/stat`` (empty when it
    cannot be read). Busy is everything but idle and I/O wait."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or len(fields) < 5:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total = sum(values)
        times[int(name[3:])] = (total - values[3] - values[4], total)
    return times


def busy_cpus(cpus: set[int], interval: float = 0.5) -> float | None:
    """How many of ``cpus`` other processes keep busy now: the busy share of each over
    ``interval`` seconds, summed (``None`` where ``/proc/stat`` cannot be read)."""
    before = cpu_times()
    if not before:
        return None
    time.sleep(interval)
    after = cpu_times()
    busy = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            elapsed = after[cpu][1] - before[cpu][1]
            if elapsed > 0:
                busy += (after[cpu][0] - before[cpu][0]) / elapsed
    return busy


def idle_cpus(cpus: int) -> tuple[int, str | None]:
    """How many of ``cpus`` other processes leave free (``cpus`` minus the busy ones, rounded,
    at least 1) and what was measured (``None`` where nothing could be)."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    busy = busy_cpus(set(affinity)) if affinity else None
    if busy is not None:
        return max(1, min(cpus, round(cpus - busy))), f"other processes use {busy:.1f} CPUs now"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus, None
    return max(1, min(cpus, round(cpus - load))), f"the load average is {load:.1f}"


def default_threads() -> tuple[int, str]:
    """The demo's thread count and why (for the log line)."""
    cpus, why = available_cpus()
    threads, measured = idle_cpus(cpus)
    reason = f"{plural(cpus, 'CPU')} usable ({why})"
    if threads < cpus:
        reason += f", {measured}: {cpus - threads} busy"
    return threads, reason

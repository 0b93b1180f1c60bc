"""Timing shared by the benchmark scripts: contenders timed in turns, medians reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


class Elapsed(float):
    """Seconds that a timed function measured itself (returned to leave its set-up out)."""


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turns (one warm-up call each first) so that a
    change of load on a shared machine hits every contender alike. A function that returns an
    :class:`Elapsed` reports its own time (e.g. to leave a set-up step out of the timing);
    any other return value is ignored."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            reported = fn()
            elapsed = time.perf_counter() - start
            times[name].append(reported if isinstance(reported, Elapsed) else elapsed)
    return {name: statistics.median(t) for name, t in times.items()}

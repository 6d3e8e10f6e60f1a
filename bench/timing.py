"""Shared timing helper for the benchmark scripts (run as `python bench/bench_*.py`, so this imports as `timing`)."""

import time


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls: the cost without other processes' interference."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)

"""The one timing loop of fastbn's benchmarks, reports and bandwidth probes."""

import time


def best_time(fn, repeat=20, min_time=0.2, max_time=None):
    """Best wall time (s) of ``fn()`` over at least ``repeat`` runs and ``min_time`` seconds
    (stopping at ``max_time`` seconds when given).  One untimed warm-up call first: it
    compiles (or loads from the disk cache) and faults the pages of fresh buffers in."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    runs = 0
    while runs < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if max_time is not None and time.perf_counter() - start > max_time:
            break
    return best

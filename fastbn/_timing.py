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


def best_per_call(fn, repeat=20, min_time=0.2, batch_time=0.002, max_time=None):
    """Best per-call wall time (s) of ``fn()``: like :func:`best_time`, but each sample
    times a batch of calls lasting about ``batch_time`` seconds and divides by the number
    of calls, so microsecond calls are not dominated by the timer's own cost (and a
    call's time is its cost in a loop of calls, as a model's layer sees it).  Calls that
    take longer than ``batch_time`` are timed one by one, as in :func:`best_time`."""
    fn()
    single = float("inf")
    for _ in range(3):  # the fastest of a few calls: one preempted call must not set the batch size
        t0 = time.perf_counter()
        fn()
        single = min(single, time.perf_counter() - t0)
    number = max(1, int(batch_time / max(single, 1e-7)))
    best = float("inf")
    start = time.perf_counter()
    runs = 0
    while runs < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
        runs += 1
        if max_time is not None and time.perf_counter() - start > max_time:
            break
    return best

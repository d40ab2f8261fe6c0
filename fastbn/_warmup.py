"""``python -m fastbn warmup``: fill Numba's on-disk cache ahead of the first real call,
or (``--first-call N``) time how new processes reach their first result."""

import os
import statistics
import subprocess
import sys
import time

import numba
import numpy as np

import fastbn
from fastbn import bench as fbench
from fastbn.cpu import small

WARMUP_DOC = """Compile every public CPU pass of fastbn (batch statistics, moments, training and
eval forward with and without running statistics and affine parameters, backward; layer,
group and instance norm forward and backward) for the named dtypes and layouts, on tensors of rank 2 to 5, so that later processes load the
kernels from Numba's disk cache instead of compiling them.  A second round compiles the
parallel kernels that tensors above fastbn.cpu.small.SMALL_SIZE values run.
Prints where the cache lives and how long each part took.

With --first-call N it compiles nothing itself: it starts N new Python processes one after
the other, each importing numpy, numba and fastbn and running one training forward and one
backward on an (8, 16, 8, 8) float32 tensor, and prints each phase's time: the first
process's apart (it compiles what the cache lacks: with an empty NUMBA_CACHE_DIR, the cold
compile time), then the best and median of the others (the warm-cache first call)."""

#: The phases :data:`FIRST_CALL` times, in order.
FIRST_CALL_PHASES = ("numpy", "numba", "import fastbn", "first forward", "first backward")

#: A new process's way to its first result.  fastbn loads its public names on first use, so
#: the first forward's time includes importing the modules it runs and loading (or
#: compiling) its kernels.
FIRST_CALL = r"""
import time
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import numba
t2 = time.perf_counter()
import fastbn
t3 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((8, 16, 8, 8), dtype=np.float32)
y, mean, invstd = fastbn.batch_norm_forward(x, training=True)
t4 = time.perf_counter()
fastbn.batch_norm_backward(x, x, mean, invstd)
t5 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
"""


def cache_locations():
    """The directories Numba's disk cache uses for fastbn's loaded kernels (from the
    dispatchers' cache locators: NUMBA_CACHE_DIR, else __pycache__ beside the sources,
    else Numba's user-wide cache directory)."""
    from numba.core.dispatcher import Dispatcher
    found = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastbn"):
            continue
        for obj in list(vars(module).values()):
            for d in (obj, getattr(obj, "parallel", None), getattr(obj, "_serial", None)):
                cache = getattr(d, "_cache", None) if isinstance(d, Dispatcher) else None
                path = getattr(cache, "_cache_path", None)
                if path:
                    found.add(path)
    return sorted(found)


def warmup_calls(dtype, layout):
    """Run each public pass once on tiny inputs of ``dtype`` in ``layout`` (ranks 2-5)."""
    from fastbn import stages
    shapes = [(6, 4), (3, 4, 5), (2, 4, 3, 5), (2, 4, 2, 3, 3)]
    for shape in shapes:
        if layout == "NHWC" and len(shape) == 2:
            continue  # (N, C) has one memory order; the NCHW round covers it
        x, dy, w, b, rm, rv = fbench.make_inputs(shape, layout, dtype)
        fastbn.batch_stats(x, layout=layout)
        stages.moments(x, layout=layout)
        for weight, bias in ((w, b), (None, None)):
            y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, layout=layout)
            fastbn.batch_norm_forward(x, weight, bias, running_mean=rm.copy(), running_var=rv.copy(),
                                      layout=layout, out=np.empty_like(x))
            fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv, training=False,
                                      layout=layout)
            fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout)
            fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout, out=np.empty_like(x))
        norm_warmup_calls(x, dy, w, b, rm, rv, layout)


def norm_warmup_calls(x, dy, weight, bias, running_mean, running_var, layout):
    """Layer, group and instance norm forward and backward once on ``x`` (C even) in
    ``layout``: every kernel signature :mod:`fastbn.cpu.norms` launches (absent affine
    parameters are placeholders of the same types, so one call with them covers both)."""
    y, mean, invstd = fastbn.group_norm_forward(x, 2, weight, bias, layout=layout)
    fastbn.group_norm_backward(dy, x, 2, mean, invstd, weight, layout=layout)
    if x.ndim > 2:
        fastbn.instance_norm(x, running_mean.copy(), running_var.copy(), weight, bias, layout=layout)
    if layout == "NCHW":  # layer norm has no layout: one round
        shape = x.shape[-1:]
        y, mean, invstd = fastbn.layer_norm_forward(x, shape, np.ones(shape, x.dtype), np.zeros(shape, x.dtype))
        fastbn.layer_norm_backward(dy, x, shape, mean, invstd, np.ones(shape, x.dtype))


def first_call_times(runs):
    """Seconds of each of :data:`FIRST_CALL_PHASES`, then the whole process's wall time
    (interpreter start and exit included), for ``runs`` new processes run one after the
    other: a list of ``runs`` tuples of 6 floats."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"first-call process failed:\n{done.stderr}")
        times.append((*map(float, done.stdout.split()), wall))
    return times


def _phase_line(columns, fmt):
    names = (*FIRST_CALL_PHASES, "total", "process")
    return "  ".join(f"{name} {fmt(c)}" for name, c in zip(names, columns))


def first_call_report(runs):
    """``python -m fastbn warmup --first-call N``: print :func:`first_call_times` of N
    processes: the first apart, then the best and median of the others (seconds)."""
    if runs < 1:
        raise ValueError(f"--first-call: expected a positive number of processes, got {runs}")
    print(f"fastbn {fastbn.__version__}, numba {numba.__version__}: first call of {runs} new processes "
          f"(NUMBA_CACHE_DIR: {numba.config.CACHE_DIR or '(unset)'}), seconds")
    rows = [(*t[:5], sum(t[:5]), t[5]) for t in first_call_times(runs)]
    print("process 1 (compiles what the cache lacks): " + _phase_line(rows[0], lambda v: f"{v:.3f}"))
    if len(rows) > 1:
        print(f"processes 2-{runs}, best / median: "
              + _phase_line(zip(*rows[1:]), lambda c: f"{min(c):.3f} / {statistics.median(c):.3f}"))
    return 0


def warmup_main(args):
    """``python -m fastbn warmup``: :func:`warmup_calls` for ``args.dtypes`` x ``args.layouts``,
    through the serial small-tensor kernels, then again with the parallel ones forced (or,
    with ``args.first_call``, :func:`first_call_report` instead)."""
    if args.first_call:
        return first_call_report(args.first_call)
    rounds = [("", None), (" (parallel kernels: SMALL_SIZE = 0)", 0)]
    print(f"fastbn {fastbn.__version__}, numba {numba.__version__}: warming the disk cache for "
          f"{' '.join(args.dtypes)} x {' '.join(args.layouts)}")
    start = time.perf_counter()
    for label, size in rounds:
        saved = None
        if size is not None:
            saved, small.SMALL_SIZE = small.SMALL_SIZE, size
        try:
            for dtype in args.dtypes:
                for layout in args.layouts:
                    t0 = time.perf_counter()
                    warmup_calls(np.dtype(dtype), layout)
                    print(f"  {dtype} {layout}{label}: {time.perf_counter() - t0:.1f} s")
        finally:
            if saved is not None:
                small.SMALL_SIZE = saved
    print(f"done in {time.perf_counter() - start:.1f} s (compiling, or loading what was already cached)")
    env_dir = numba.config.CACHE_DIR
    print(f"NUMBA_CACHE_DIR: {env_dir or '(unset)'}")
    locations = cache_locations()
    print("cache: " + (", ".join(locations) if locations else "none (caching unavailable: kernels compile "
                                                                  "in memory in every process)"))
    return 0

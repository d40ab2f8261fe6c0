"""The roofline of ``python -m fastbn bench`` and the asv suite: what plain data movement
over a case's own bytes costs (:func:`case_roofline`), the memoized read/copy passes of
one tensor (:func:`roofline`), and whether a case fits in the last-level cache."""

import math
import os

import numba as _numba
import numpy as np

from fastbn._timing import best_per_call
from fastbn.cpu._jit import guarded, parallel_kernel
from fastbn.half import storage_view

_ROOFLINES = {}


def roofline(shape, dtype, repeat=20, min_time=0.1, fresh=False):
    """The read and copy passes of fastbn's bandwidth kernels over one tensor's bytes,
    with the current thread count (memoized); see :func:`fastbn.cpu.bandwidth.roofline`."""
    import numba

    from fastbn.cpu.bandwidth import roofline as measure
    key = (tuple(shape), np.dtype(dtype).str, numba.get_num_threads())
    if fresh or key not in _ROOFLINES:
        _ROOFLINES[key] = measure(math.prod(shape) * np.dtype(dtype).itemsize, dtype, repeat, min_time)
    return _ROOFLINES[key]


def roofline_seconds(op, roof):
    """Lower bound on an op's time from the measured read/copy passes of one tensor."""
    return {"stats": roof["read_s"],
            "forward_train": roof["read_s"] + roof["copy_s"],
            "forward_eval": roof["copy_s"],
            # read dy and x; then read dy, and read x while writing dx
            "backward": 3 * roof["read_s"] + roof["copy_s"]}[op]


# --- Per-case roofline ------------------------------------------------------------------
#
# A case's bound is the plain data movement its traffic model implies, over the case's own
# arrays (the same bytes, hence the same cache residency), in one compiled call, timed the
# same way (warm-up call, then best of) right after the case.  A bound measured over other,
# freshly allocated arrays, or as several separate launches, reads slower than the
# kernel on small or in-cache tensors (percentages of thousands).

def _probe(a, b, out, reads, copy, chunks, partial):
    """``reads`` read passes over a (and b when it has a's size), then out = a (+ b) when
    ``copy``; each of ``chunks`` contiguous chunks is one work item, passes in sequence
    within it, so a chunk larger than the caches is re-read from memory as a kernel's
    second pass would be."""
    n = a.size
    two = b.size == n
    for c in _numba.prange(chunks):
        lo = c * n // chunks
        hi = (c + 1) * n // chunks
        # Slice views and range(size): loops over computed bounds do not vectorize.
        xs = a[lo:hi]
        ys = out[lo:hi]
        gs = b[lo:hi] if two else b
        # Sums in the data's own dtype: a float64 sum converts every value and runs at
        # the speed of fastbn's float64 reductions, not of memory (the read pass over
        # (32, 64, 56, 56) float32 took 4.4 ms as a float64 sum, 0.8 ms as a float32 one).
        # The sum only keeps the reads alive.
        s = np.zeros(1, xs.dtype)[0]
        for _ in range(reads):
            for i in range(xs.size):
                s += xs[i]
            if two:
                for i in range(gs.size):
                    s += gs[i]
        if copy:
            if two:
                for i in range(xs.size):
                    ys[i] = xs[i] + gs[i]
            else:
                for i in range(xs.size):
                    ys[i] = xs[i]
        partial[c] = s


# The serial build is GuardedKernel.serial: a clone under its own name, so the two builds
# get distinct on-disk cache entries (Numba's cache key omits ``parallel``: with one name,
# whichever build was cached first was loaded for both, and the "parallel" probe ran on
# one thread).
_probe_kernel = guarded(parallel_kernel(_probe))
_probe_parallel = _probe_kernel.parallel
_probe_serial = _probe_kernel.serial

#: Per op: (read passes over the inputs, whether a copy pass writes the output); backward
#: reads dy and x, forward ops read x only.
PROBE_PASSES = {"stats": (1, False), "forward_train": (1, True), "forward_eval": (0, True),
                "backward": (1, True)}


def case_roofline(op, x, dy, out, repeat=10, min_time=0.1, timer=None):
    """Best time (s) of the data movement ``op`` implies over the case's own arrays ``x``,
    ``dy`` (backward only) and ``out``: the faster of a serial and a parallel probe, since
    either is a way to move those bytes."""
    timer = timer or best_per_call
    reads, copy = PROBE_PASSES[op]
    # 16-bit storage as its integer kernel view: the same bytes, a type Numba takes.
    a, dy, out = (storage_view(v, v.dtype.name) for v in (x.reshape(-1), dy.reshape(-1), out.reshape(-1)))
    b = dy if op == "backward" else a[:0]
    o = out
    best = float("inf")
    for kernel, chunks in ((_probe_serial, 1), (_probe_parallel, max(1, _numba.get_num_threads()))):
        partial = np.empty(chunks)
        best = min(best, timer(lambda: kernel(a, b, o, reads, copy, chunks, partial), repeat, min_time))
    return best


def last_level_cache_bytes(sysfs="/sys/devices/system/cpu/cpu0/cache"):
    """Size of the largest (last-level) cache, from Linux sysfs; ``os.sysconf`` or 32 MiB
    when sysfs is not there."""
    found = []
    try:
        for entry in os.listdir(sysfs):
            if entry.startswith("index"):
                with open(os.path.join(sysfs, entry, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(sysfs, entry, "size")) as f:
                    found.append((level, _parse_size(f.read())))
    except (OSError, ValueError):
        found = []
    size = max(found)[1] if found else None
    if size:
        return size
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            value = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if value and value > 0:
            return value
    return 32 << 20


def _parse_size(text):
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], None)
    return int(text[:-1]) * scale if scale else int(text)


#: Distinct tensors an op touches (its footprint): x; x, y; x, y; dy, x, dx.
FOOTPRINT = {"stats": 1, "forward_train": 2, "forward_eval": 2, "backward": 3}


def footprint_bytes(op, shape, dtype):
    return FOOTPRINT[op] * math.prod(shape) * np.dtype(dtype).itemsize


def cache_label(op, shape, dtype, llc_bytes):
    """"in-cache" when the op's footprint (the distinct bytes it touches) fits in the
    last-level cache, else "DRAM"."""
    return "in-cache" if footprint_bytes(op, shape, dtype) <= llc_bytes else "DRAM"

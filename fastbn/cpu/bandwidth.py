"""Memory-bandwidth probes: the roofline fastbn's kernels are measured against.

Two Numba kernels, compiled like fastbn's own (same decorator, same threads): a read
pass (a sum) and a copy pass over a flat array, split into fixed blocks over all threads.
A batch-norm pass can be no faster than the pure data movement it implies: training
forward reads ``x`` once for the statistics and once more while writing ``y``, i.e. one
read pass plus one copy pass of the same bytes.  :func:`roofline` times both.
"""

import numba
import numpy as np
from numba import prange

from .._timing import best_time
from ._jit import parallel_kernel

#: Values per work item of the probes.
BLOCK = 1 << 16


@parallel_kernel
def read_pass(x1, block, partial):
    """partial[i] = sum of block i of x1 (float64 accumulation); reads every byte once."""
    for item in prange(partial.size):
        xs = x1[item * block:min((item + 1) * block, x1.size)]
        s = 0.0
        for i in range(xs.size):
            s += np.float64(xs[i])
        partial[item] = s


@parallel_kernel
def copy_pass(x1, block, y1):
    """y1 = x1, block by block: reads and writes every byte once."""
    for item in prange((x1.size + block - 1) // block):
        xs = x1[item * block:min((item + 1) * block, x1.size)]
        ys = y1[item * block:min((item + 1) * block, x1.size)]
        for i in range(xs.size):
            ys[i] = xs[i]


def roofline(nbytes, dtype=np.float32, repeat=20, min_time=0.1):
    """Best times (s) of a read pass and of a copy pass over ``nbytes`` of ``dtype``.

    Returns a dict: ``read_s``, ``copy_s``, ``read_gbps`` (bytes read / s) and
    ``copy_gbps`` (bytes read + written / s), measured with the current thread count.
    """
    dtype = np.dtype(dtype)
    n = max(1, int(nbytes) // dtype.itemsize)
    x = np.ones(n, dtype)
    y = np.zeros(n, dtype)  # written once, so its pages are mapped before timing
    partial = np.empty(-(-n // BLOCK))
    read_s = best_time(lambda: read_pass(x, BLOCK, partial), repeat, min_time)
    copy_s = best_time(lambda: copy_pass(x, BLOCK, y), repeat, min_time)
    nb = n * dtype.itemsize
    return {"read_s": read_s, "copy_s": copy_s, "read_gbps": nb / read_s / 1e9,
            "copy_gbps": 2 * nb / copy_s / 1e9, "threads": numba.get_num_threads()}

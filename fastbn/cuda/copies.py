"""fastbn's own strided copy, launched on the call's stream.

Numba's ``dst[...] = src`` between device arrays of different strides synchronizes
the host; this kernel does the same copy asynchronously.  Arrays of rank 2-5 are seen
as rank 5 (leading extents of 1), so one compiled kernel per dtype serves every rank
and any strides, negative ones included.
"""

import numpy as np
from numba import cuda

from .arrays import SIMULATOR
from .launching import launch
from .plans import elementwise_grid

RANK = 5


@cuda.jit
def copy5(src, dst):
    """dst[i] = src[i] over the 5-D index space, a grid-stride loop over the flat
    C-order index (one unravel per element: copies only run for non-dense inputs)."""
    d0, d1, d2, d3, d4 = dst.shape
    size = d0 * d1 * d2 * d3 * d4
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < size:
        r = i
        i4 = r % d4
        r //= d4
        i3 = r % d3
        r //= d3
        i2 = r % d2
        r //= d2
        i1 = r % d1
        i0 = r // d1
        dst[i0, i1, i2, i3, i4] = src[i0, i1, i2, i3, i4]
        i += stride


def as_rank5(a):
    """``a`` (numba device array, rank <= 5) viewed with leading extents of 1, same memory."""
    pad = RANK - a.ndim
    shape = (1,) * pad + tuple(a.shape)
    strides = (0,) * pad + tuple(a.strides)
    if SIMULATOR:
        return cuda.devicearray.FakeCUDAArray(np.lib.stride_tricks.as_strided(a._ary, shape, strides))
    return cuda.devicearray.DeviceNDArray(shape, strides, a.dtype, gpu_data=a.gpu_data)


def copy(src, dst, stream):
    """Queue ``dst[...] = src`` (numba arrays of one shape and dtype) on ``stream``."""
    if src.size == 0:
        return
    grid, block = elementwise_grid(src.size)
    launch(copy5, grid, block, stream, as_rank5(src), as_rank5(dst))

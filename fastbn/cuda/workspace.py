"""Scratch memory reused across calls: per (device, stream, thread, name, dtype, size class).

A call's scratch (per-block partials, the reductions' completion counters,
intermediate per-channel vectors) lives only while its kernels run.  Kernels on one
stream run in order, so the next call on the same stream may reuse the same bytes:
after the first calls no call allocates scratch.  Sizes are rounded up to a power of
two so that nearby shapes share one buffer.  ``name`` keeps apart the buffers one call
uses at the same time.

Counters are created zeroed (one kernel launch, on the stream, when the buffer is
new) and the kernels that use them set them back to zero before they finish, so they
are zero at the start of every call.
"""

import threading

import numpy as np
from numba import cuda

from .launching import launch
from .plans import elementwise_grid

_buffers = {}
_lock = threading.Lock()


def _size_class(size):
    return 1 << max(0, (int(size) - 1).bit_length())


@cuda.jit
def _zero(a):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < a.size:
        a[i] = 0
        i += stride


def scratch(device, stream, name, size, dtype, zeroed=False):
    """A 1-D device array of at least ``size`` values of ``dtype``, reserved for
    ``name`` on ``stream``; ``zeroed`` for one that starts zeroed when new (counters)."""
    dtype = np.dtype(dtype)
    klass = _size_class(max(size, 1))
    # Per thread too: two threads launching on one stream interleave their launches.
    key = (device, id(stream), threading.get_ident(), name, dtype.str, klass)
    with _lock:
        entry = _buffers.get(key)
        if entry is None:
            buffer = cuda.device_array(klass, dtype=dtype, stream=stream)
            if zeroed:
                grid, block = elementwise_grid(klass)
                launch(_zero, grid, block, stream, buffer)
            # The stream is kept with its buffer so that its id is never reused by another.
            entry = _buffers[key] = (buffer, stream)
    return entry[0]


def clear():
    """Forget every cached buffer (they are freed when no queued kernel needs them)."""
    with _lock:
        _buffers.clear()

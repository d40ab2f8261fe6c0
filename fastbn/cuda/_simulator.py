"""Making fastbn's kernels run faithfully under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``).  Used only under the simulator; on a GPU nothing here runs.

Warp shuffles.  The simulator runs each thread of a block as a Python thread but implements no warp
shuffle, so kernels that merge within a warp by ``cuda.shfl_down_sync`` could not run
there.  :func:`install` adds a faithful ``shfl_down_sync`` to the simulator's fake
``cuda`` module: the lanes of a warp meet at a barrier, publish their values, and each
reads lane ``lane + delta`` (its own value when that lane is past the warp, as on the
hardware).  Like the hardware it needs every lane of the warp to take part.

Device functions of another module.  While a kernel runs, the simulator rebinds the
global ``cuda`` of the kernel's module to the launch's fake module, and does the same
for a device function's module on every call, restoring it on return.  The threads
of a block run concurrently, so when a kernel of one module (``planes``) calls device
functions of another (``merge``) one thread's restore pulls the fake module from
under another thread still inside the function.  :func:`install` binds the ``cuda``
global of fastbn's kernel modules to a proxy for the running launch's fake module
instead, which the simulator leaves alone.

Shared arrays.  The simulator gives the threads of a launch one array per
``cuda.shared.array`` call site, created by the first thread to get there; two threads
that get there together can each create one (an unlocked check-then-set), and one of
them then works on an array the others never see.  It is rare, but it made merges read
uninitialized slots now and then.  :func:`install` makes that allocation atomic.
"""

import sys
import threading

import numpy as np
from numba import cuda as _real_cuda
from numba.core import types
from numba.cuda.simulator import kernel as _sim_kernel
from numba.cuda.simulator import kernelapi
from numba.np import numpy_support

#: fastbn modules whose functions run on the device.
KERNEL_MODULES = ("fastbn.cuda.merge", "fastbn.cuda.planes", "fastbn.cuda.rows",
                  "fastbn.cuda.channels", "fastbn.cuda.copies", "fastbn.cuda.workspace",
                  "fastbn.cuda.elementwise", "fastbn.cuda.loadstore")

WARP_SIZE = 32
#: A lane that waits longer than this at a shuffle means a lane never arrived (a bug):
#: fail instead of hanging the test run.
BARRIER_TIMEOUT_S = 120.0

_registry_lock = threading.Lock()


class _WarpExchange:
    """The meeting point of one warp's lanes for shuffles."""

    def __init__(self, lanes):
        self.values = [None] * lanes
        self.barrier = threading.Barrier(lanes, timeout=BARRIER_TIMEOUT_S)

    def shuffle_down(self, lane, value, delta):
        self.values[lane] = value
        self.barrier.wait()
        source = lane + delta
        result = self.values[source] if source < len(self.values) else value
        self.barrier.wait()  # nobody overwrites values until every lane has read
        return result


def _shfl_down_sync(fake_cuda, mask, value, delta):
    thread = threading.current_thread()
    block_dim = fake_cuda.blockDim
    block_size = block_dim.x * block_dim.y * block_dim.z
    warp = thread.thread_id // WARP_SIZE
    key = (tuple(thread.blockIdx), warp)
    with _registry_lock:
        exchanges = fake_cuda.__dict__.setdefault("_fastbn_warp_exchanges", {})
        exchange = exchanges.get(key)
        if exchange is None:
            exchange = exchanges[key] = _WarpExchange(min(WARP_SIZE, block_size - warp * WARP_SIZE))
    return exchange.shuffle_down(thread.thread_id % WARP_SIZE, value, delta)


def _shared_array(shared, shape, dtype):
    """``FakeCUDAShared.array`` with an atomic allocation, keyed like the simulator's
    by the caller's file and line."""
    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    else:  # a NumPy scalar type (np.float32), which the simulator's dynamic branch cannot size
        dtype = np.dtype(dtype)
    if shape == 0:  # dynamic shared memory: one preallocated buffer, nothing to race on
        return _simulator_shared_array(shared, shape, dtype)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    with _registry_lock:
        array = shared._allocations.get(key)
        if array is None:
            array = shared._allocations[key] = np.empty(shape, dtype)
    return array


_simulator_shared_array = kernelapi.FakeCUDAShared.array


class _LaunchCudaProxy:
    """``cuda`` for device code: the running launch's fake module, else numba.cuda."""

    def __getattr__(self, name):
        context = _sim_kernel._get_kernel_context()
        return getattr(_real_cuda if context is None else context, name)


def install():
    """Add ``shfl_down_sync`` to the simulator, make its shared-array allocation atomic
    and bind the kernel modules' ``cuda`` to :class:`_LaunchCudaProxy` (idempotent)."""
    if not hasattr(kernelapi.FakeCUDAModule, "shfl_down_sync"):
        kernelapi.FakeCUDAModule.shfl_down_sync = _shfl_down_sync
    kernelapi.FakeCUDAShared.array = _shared_array
    proxy = _LaunchCudaProxy()
    for name in KERNEL_MODULES:
        sys.modules[name].cuda = proxy

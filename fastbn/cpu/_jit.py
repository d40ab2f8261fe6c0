"""The one way fastbn compiles a CPU kernel, and the guard every kernel launch goes through.

Kernels compile lazily, once per argument types (dtype and array layout), and are cached
on disk next to the source (``cache=True``) so a new process loads them instead of
recompiling.  Where no cache location is writable (read-only install, no writable home,
``NUMBA_CACHE_DIR`` unusable) they compile in memory instead; caching is an optimization,
never a reason for ``import fastbn`` to fail.  Fast-math is limited to reassociation and
contraction: that lets LLVM vectorize the float reductions, while NaN and Inf keep their
IEEE meaning (a NaN in a channel must propagate into that channel's output, never be
optimized away).

Threads and processes.  Numba runs ``parallel=True`` kernels on one process-wide
threading layer, picked at the first launch (``tbb``, ``omp`` or ``workqueue``):

- ``workqueue`` is not thread-safe: two Python threads launching kernels at once abort
  the process.  While the layer is unknown (before the first launch) or is
  ``workqueue``, every fastbn launch holds one process-wide lock, so concurrent calls
  from Python threads are serialized instead.  ``tbb`` and ``omp`` are thread-safe and
  run concurrent launches without the lock.  (Numba code of your own that launches on
  ``workqueue`` at the same time is outside what this lock can see.)
- GNU OpenMP (the ``omp`` layer on Linux) is not fork-safe: Numba terminates a forked
  child at its first parallel launch if the parent had launched one.  A child forked
  from such a process therefore runs fastbn's kernels single-threaded (the same code
  compiled without ``parallel``, cached separately), which gives the same results.
"""

import functools
import os
import threading
import types

import numba

FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})

_launch_lock = threading.Lock()
#: None until the threading layer is known, then whether it is thread-safe.
_layer_thread_safe = None
#: True in a process forked from one that had launched kernels on GNU OpenMP.
_serial_only = False


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process yet
        return None


def _needs_lock():
    global _layer_thread_safe
    if _layer_thread_safe is None:
        layer = _threading_layer()
        if layer is None:
            return True
        _layer_thread_safe = layer in ("tbb", "omp")
    return not _layer_thread_safe


def _after_fork_in_child():
    global _launch_lock, _serial_only
    # A lock held by another thread of the parent at fork time would never be released.
    _launch_lock = threading.Lock()
    if _threading_layer() == "omp":
        from numba.np.ufunc import omppool
        if getattr(omppool, "openmp_vendor", "GNU") == "GNU":
            _serial_only = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _njit(fn, **options):
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(cache=False, **options)(fn)


class GuardedKernel:
    """A compiled ``parallel=True`` kernel called through the thread/fork guard.

    Calling it runs ``self.parallel`` (the Numba dispatcher), under the launch lock when
    the threading layer needs one, or ``self.serial`` in a forked child of a GNU OpenMP
    process.  Other attributes (``signatures``, ``py_func``...) are the dispatcher's.
    """

    def __init__(self, dispatcher):
        self.parallel = dispatcher
        self._serial = None
        functools.update_wrapper(self, dispatcher.py_func)

    @property
    def serial(self):
        """The same kernel compiled without ``parallel`` (``prange`` runs as ``range``)."""
        if self._serial is None:
            fn = self.parallel.py_func
            # A distinct qualname gives the serial build its own on-disk cache entry
            # (Numba's cache key does not include the ``parallel`` flag).
            clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                       fn.__defaults__, fn.__closure__)
            clone.__qualname__ = fn.__qualname__ + "_serial"
            clone.__module__ = fn.__module__
            options = {k: v for k, v in self.parallel.targetoptions.items()
                       if k not in ("parallel", "nopython", "cache")}
            self._serial = _njit(clone, **options)
        return self._serial

    def __call__(self, *args):
        if _serial_only:
            return self.serial(*args)
        if _needs_lock():
            with _launch_lock:
                return self.parallel(*args)
        return self.parallel(*args)

    def __getattr__(self, name):
        if name == "parallel":  # not yet set (during __init__)
            raise AttributeError(name)
        return getattr(self.parallel, name)


def guarded(kernel):
    """``kernel`` (from :func:`parallel_kernel`) wrapped so every launch is thread/fork-safe.

    The host driver calls kernels only through these wrappers; the kernel modules keep
    the plain Numba dispatchers (for inspection and for use from other jitted code).
    """
    return GuardedKernel(kernel)


def parallel_kernel(fn):
    """Compile ``fn`` as a parallel (``prange``) kernel that releases the GIL."""
    return _njit(fn, parallel=True, nogil=True, fastmath=set(FASTMATH))


def serial_kernel(fn):
    """Compile ``fn`` as a single-threaded kernel (O(C) per-channel loops) that releases the
    GIL, with strict IEEE arithmetic: the per-channel algebra orders its products to avoid
    overflow (see :mod:`fastbn.algebra`), which reassociation could undo."""
    return _njit(fn, nogil=True)


def inline_helper(fn):
    """Compile a small scalar helper that is inlined into the kernels calling it."""
    return _njit(fn, nogil=True, inline="always", fastmath=set(FASTMATH))

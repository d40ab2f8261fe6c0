"""The one way fastbn compiles a CPU kernel.

Kernels compile lazily, once per argument types (dtype and array layout), and are cached
on disk next to the source (``cache=True``) so a new process loads them instead of
recompiling.  Fast-math is limited to reassociation and contraction: that lets LLVM
vectorize the float reductions, while NaN and Inf keep their IEEE meaning (a NaN in a
channel must propagate into that channel's output, never be optimized away).
"""

import numba

FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})


def parallel_kernel(fn):
    """Compile ``fn`` as a parallel (``prange``) kernel that releases the GIL."""
    return numba.njit(parallel=True, cache=True, nogil=True, fastmath=set(FASTMATH))(fn)


def inline_helper(fn):
    """Compile a small scalar helper that is inlined into the kernels calling it."""
    return numba.njit(cache=True, nogil=True, inline="always", fastmath=set(FASTMATH))(fn)

"""Plane kernels: ``x`` viewed as (N, C, S), each (n, c) plane of S values contiguous.

The :data:`~fastbn.geometry.PLANES` family (channel-first memory).  The reductions run
here for planes large enough to fill the vector lanes (see ``plans.MIN_PLANE``; smaller
planes reduce as rows, :mod:`fastbn.cpu.rows`, on an (N, C * S) view).  Work is
split into items of at most ``block`` contiguous values of one plane, so a few huge
planes (N=1, many pixels) and many small ones both spread over every thread.  Item ``i``
covers plane ``i // blocks_per_plane``, values ``[b * block, min((b + 1) * block, S))``
with ``b = i % blocks_per_plane``; the loops run over slice views with ``range(len)``
bounds, the shape LLVM vectorizes.

Data arrays are kernel views (:mod:`fastbn.half`): values are loaded with ``widen`` and
stored with ``narrow``, which are no-ops for float32/float64 and the exact 16-bit
conversions for float16/bfloat16 storage (then per-channel vectors are float32).
"""

import numpy as np
from numba import prange

from ._jit import inline_helper, parallel_kernel
from ..algebra import shifted_moments
from ..half import narrow, widen
from .epilogue import masked


@inline_helper
def plane_block(item, blocks_per_plane, num_c, block, size):
    """(n, c, lo, hi) of work item ``item``: values [lo, hi) of plane (n, c).

    Whole planes (one block each) are the common case and skip a division and a min:
    with planes of 49 values (7 x 7) the decoding otherwise costs as much as the data.
    """
    if blocks_per_plane == 1:
        n = item // num_c
        return n, item - n * num_c, 0, size
    plane = item // blocks_per_plane
    lo = (item - plane * blocks_per_plane) * block
    n = plane // num_c
    return n, plane - n * num_c, lo, min(lo + block, size)


@parallel_kernel
def planes_moments(x3, block, part_mean, part_m2):
    """Per-item (mean, M2) of x3 (N, C, S); outputs (N * blocks_per_plane, C) float64."""
    num_n, num_c, size = x3.shape
    blocks_per_plane = part_mean.shape[0] // num_n
    for item in prange(num_n * num_c * blocks_per_plane):
        n, c, lo, hi = plane_block(item, blocks_per_plane, num_c, block, size)
        xs = x3[n, c, lo:hi]
        pivot = np.float64(widen(xs[0]))
        s1 = 0.0
        s2 = 0.0
        for i in range(xs.size):
            d = np.float64(widen(xs[i])) - pivot
            s1 += d
            s2 += d * d
        mean, m2 = shifted_moments(pivot, s1, s2, xs.size)
        part_mean[n * blocks_per_plane + lo // block, c] = mean
        part_m2[n * blocks_per_plane + lo // block, c] = m2


@parallel_kernel
def planes_apply(x3, residual3, center, scale, shift, floor, block, y3):
    """y3 = max((x3 - center[c]) * scale[c] + shift[c] + residual3, floor) for x3, y3 (N, C, S).

    Vectors (C,) and ``floor`` in the compute dtype; ``floor`` is -inf (no activation) or 0
    (ReLU), so the epilogue costs one max per value and NaN stays NaN.  ``residual3`` is
    like x3, or None for no residual (a compile-time choice: None compiles its own
    specialization, without the residual's loop).
    """
    num_n, num_c, size = x3.shape
    blocks_per_plane = (size + block - 1) // block
    for item in prange(num_n * num_c * blocks_per_plane):
        n, c, lo, hi = plane_block(item, blocks_per_plane, num_c, block, size)
        xs = x3[n, c, lo:hi]
        ys = y3[n, c, lo:hi]
        m = center[c]
        a = scale[c]
        s = shift[c]
        if residual3 is not None:
            rs = residual3[n, c, lo:hi]
            for i in range(xs.size):
                ys[i] = narrow(max((widen(xs[i]) - m) * a + s + widen(rs[i]), floor), ys.dtype)
        else:
            for i in range(xs.size):
                ys[i] = narrow(max((widen(xs[i]) - m) * a + s, floor), ys.dtype)


@parallel_kernel
def planes_backward_sums(dy3, x3, y3, mean, block, part_sum_dy, part_sum_dy_xmu):
    """Per-item sum(g) and sum(g * (x - mean[c])) in float64; outputs (N * blocks_per_plane, C).

    ``g = dy3``, or with the ReLU mask ``g = 0 where y3 <= 0 else dy3`` when ``y3`` (the
    forward's output, like x3) is not None (None compiles without the mask).
    """
    num_n, num_c, size = x3.shape
    blocks_per_plane = part_sum_dy.shape[0] // num_n
    zero = widen(np.zeros(1, dy3.dtype)[0])
    for item in prange(num_n * num_c * blocks_per_plane):
        n, c, lo, hi = plane_block(item, blocks_per_plane, num_c, block, size)
        xs = x3[n, c, lo:hi]
        gs = dy3[n, c, lo:hi]
        m = mean[c]
        s1 = 0.0
        s2 = 0.0
        if y3 is not None:
            ms = y3[n, c, lo:hi]
            for i in range(xs.size):
                g = np.float64(masked(widen(gs[i]), widen(ms[i]), zero))
                s1 += g
                s2 += g * (np.float64(widen(xs[i])) - m)
        else:
            for i in range(xs.size):
                g = np.float64(widen(gs[i]))
                s1 += g
                s2 += g * (np.float64(widen(xs[i])) - m)
        part_sum_dy[n * blocks_per_plane + lo // block, c] = s1
        part_sum_dy_xmu[n * blocks_per_plane + lo // block, c] = s2


@parallel_kernel
def planes_backward_apply(dy3, x3, y3, center, dy_scale, x_scale, shift, block, dx3, g3):
    """dx3 = g * dy_scale[c] + (x3 - center[c]) * x_scale[c] + shift[c]; vectors in the compute dtype.

    ``g = dy3``, or masked by ``y3 <= 0`` when ``y3`` is not None (see
    :func:`planes_backward_sums`); ``g3``, when not None (only with ``y3``), receives
    ``g`` (the residual's gradient).
    """
    num_n, num_c, size = x3.shape
    blocks_per_plane = (size + block - 1) // block
    zero = widen(np.zeros(1, dx3.dtype)[0])
    for item in prange(num_n * num_c * blocks_per_plane):
        n, c, lo, hi = plane_block(item, blocks_per_plane, num_c, block, size)
        xs = x3[n, c, lo:hi]
        gs = dy3[n, c, lo:hi]
        ds = dx3[n, c, lo:hi]
        m = center[c]
        a = dy_scale[c]
        bx = x_scale[c]
        s = shift[c]
        if g3 is not None:
            ms = y3[n, c, lo:hi]
            os = g3[n, c, lo:hi]
            for i in range(xs.size):
                g = masked(widen(gs[i]), widen(ms[i]), zero)
                os[i] = narrow(g, os.dtype)
                ds[i] = narrow(g * a + (widen(xs[i]) - m) * bx + s, ds.dtype)
        elif y3 is not None:
            ms = y3[n, c, lo:hi]
            for i in range(xs.size):
                g = masked(widen(gs[i]), widen(ms[i]), zero)
                ds[i] = narrow(g * a + (widen(xs[i]) - m) * bx + s, ds.dtype)
        else:
            for i in range(xs.size):
                ds[i] = narrow(widen(gs[i]) * a + (widen(xs[i]) - m) * bx + s, ds.dtype)

"""Serial kernels for small tensors, where a parallel launch costs more than the work.

A tensor of a few thousand values is reduced and normalized in microseconds by one
thread; starting a parallel region costs several, and beside another runtime's thread
pool (PyTorch's OpenMP) far more.  Up to :data:`SMALL_SIZE` values the stages run these
kernels instead of the planes and rows ones.

Every kernel takes the C-contiguous ``(outer, kept, inner)`` view of
:mod:`fastbn.geometry`; when ``inner == 1`` (rows) the kept axis is the vector loop.
"""

import numpy as np

from ..algebra import shifted_moments
from ._jit import serial_kernel, serial_reduction

#: Tensors with at most this many values run serially.
SMALL_SIZE = 1 << 15


@serial_reduction
def small_moments(x3, count, mean, m2):
    """Per-kept-index (count, mean, M2) of x3 (outer, kept, inner), float64 outputs (kept,).

    Rows (``inner == 1``) are read as C-contiguous (outer, kept) rows, so the kept loop
    vectorizes (a strided view of a 3-D array ran scalar, ~3x slower); planes sum with
    reassociation (vectorized).
    """
    outer, kept, inner = x3.shape
    pivot = np.empty(kept)
    s1 = np.zeros(kept)
    s2 = np.zeros(kept)
    if inner == 1:
        x2 = x3.reshape(outer, kept)
        for k in range(kept):
            pivot[k] = x2[0, k]
        for o in range(outer):
            row = x2[o]
            for k in range(kept):
                d = np.float64(row[k]) - pivot[k]
                s1[k] += d
                s2[k] += d * d
    else:
        for k in range(kept):
            pivot[k] = x3[0, k, 0]
        for o in range(outer):
            for k in range(kept):
                plane = x3[o, k]
                p = pivot[k]
                a = 0.0
                b = 0.0
                for i in range(inner):
                    d = np.float64(plane[i]) - p
                    a += d
                    b += d * d
                s1[k] += a
                s2[k] += b
    n = outer * inner
    for k in range(kept):
        count[k] = n
        mean[k], m2[k] = shifted_moments(pivot[k], s1[k], s2[k], n)


@serial_kernel
def small_apply(x3, center, scale, shift, y3):
    """y3 = (x3 - center[k]) * scale[k] + shift[k] over (outer, kept, inner) views."""
    outer, kept, inner = x3.shape
    for o in range(outer):
        if inner == 1:
            xr = x3[o, :, 0]
            yr = y3[o, :, 0]
            for k in range(kept):
                yr[k] = (xr[k] - center[k]) * scale[k] + shift[k]
        else:
            for k in range(kept):
                xs = x3[o, k]
                ys = y3[o, k]
                m = center[k]
                a = scale[k]
                s = shift[k]
                for i in range(inner):
                    ys[i] = (xs[i] - m) * a + s


@serial_kernel
def small_backward_sums(dy3, x3, mean, count, sum_dy, sum_dy_xmu):
    """Per-kept-index count, sum(dy) and sum(dy * (x - mean)), float64 outputs (kept,)."""
    outer, kept, inner = x3.shape
    for k in range(kept):
        count[k] = outer * inner
        sum_dy[k] = 0.0
        sum_dy_xmu[k] = 0.0
    for o in range(outer):
        if inner == 1:
            xr = x3[o, :, 0]
            gr = dy3[o, :, 0]
            for k in range(kept):
                g = np.float64(gr[k])
                sum_dy[k] += g
                sum_dy_xmu[k] += g * (np.float64(xr[k]) - mean[k])
        else:
            for k in range(kept):
                xs = x3[o, k]
                gs = dy3[o, k]
                m = np.float64(mean[k])
                a = 0.0
                b = 0.0
                for i in range(inner):
                    g = np.float64(gs[i])
                    a += g
                    b += g * (np.float64(xs[i]) - m)
                sum_dy[k] += a
                sum_dy_xmu[k] += b


@serial_kernel
def small_backward_apply(dy3, x3, center, dy_scale, x_scale, shift, dx3):
    """dx3 = dy3 * dy_scale[k] + (x3 - center[k]) * x_scale[k] + shift[k]."""
    outer, kept, inner = x3.shape
    for o in range(outer):
        if inner == 1:
            xr = x3[o, :, 0]
            gr = dy3[o, :, 0]
            dr = dx3[o, :, 0]
            for k in range(kept):
                dr[k] = gr[k] * dy_scale[k] + (xr[k] - center[k]) * x_scale[k] + shift[k]
        else:
            for k in range(kept):
                xs = x3[o, k]
                gs = dy3[o, k]
                ds = dx3[o, k]
                m = center[k]
                a = dy_scale[k]
                bx = x_scale[k]
                s = shift[k]
                for i in range(inner):
                    ds[i] = gs[i] * a + (xs[i] - m) * bx + s

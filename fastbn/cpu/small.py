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
from .epilogue import masked
from ._jit import serial_kernel

#: Tensors with at most this many values run serially.
SMALL_SIZE = 1 << 15


@serial_kernel
def small_moments(x3, count, mean, m2):
    """Per-kept-index (count, mean, M2) of x3 (outer, kept, inner), float64 outputs (kept,).

    Read as C-contiguous rows of ``kept * inner`` columns, each column summing its own
    shifted values (the loop over columns vectorizes without reassociation; a 3-D
    strided view ran scalar, ~3x slower), then each kept index adds its ``inner``
    columns in order.  Strict IEEE arithmetic in a fixed order: a reassociated sum would
    vectorize differently where LLVM inlines it (the one-call passes of
    :mod:`fastbn.cpu.fused`), and they must equal the stages bit for bit.
    """
    outer, kept, inner = x3.shape
    x2 = x3.reshape(outer, kept * inner)
    pivot = np.empty(kept)
    column_pivot = np.empty(kept * inner)
    for k in range(kept):
        pivot[k] = x2[0, k * inner]
        column_pivot[k * inner:(k + 1) * inner] = pivot[k]
    s1 = np.zeros(kept * inner)
    s2 = np.zeros(kept * inner)
    for o in range(outer):
        row = x2[o]
        for j in range(row.size):
            d = np.float64(row[j]) - column_pivot[j]
            s1[j] += d
            s2[j] += d * d
    n = outer * inner
    for k in range(kept):
        a = 0.0
        b = 0.0
        for j in range(k * inner, (k + 1) * inner):  # each kept index's columns, in order
            a += s1[j]
            b += s2[j]
        count[k] = n
        mean[k], m2[k] = shifted_moments(pivot[k], a, b, n)


@serial_kernel
def small_apply(x3, residual3, center, scale, shift, floor, y3):
    """y3 = max((x3 - center[k]) * scale[k] + shift[k] + residual3, floor) over (outer, kept,
    inner) views; ``residual3`` None for none (compiled without it), ``floor`` -inf or 0 (ReLU)."""
    outer, kept, inner = x3.shape
    if inner == 1:
        x2 = x3.reshape(outer, kept)
        y2 = y3.reshape(outer, kept)
        if residual3 is not None:
            r2 = residual3.reshape(outer, kept)
            for o in range(outer):
                xr, yr, rr = x2[o], y2[o], r2[o]
                for k in range(kept):
                    yr[k] = max((xr[k] - center[k]) * scale[k] + shift[k] + rr[k], floor)
        else:
            for o in range(outer):
                xr, yr = x2[o], y2[o]
                for k in range(kept):
                    yr[k] = max((xr[k] - center[k]) * scale[k] + shift[k], floor)
        return
    for o in range(outer):
        for k in range(kept):
            xs = x3[o, k]
            ys = y3[o, k]
            m = center[k]
            a = scale[k]
            s = shift[k]
            if residual3 is not None:
                rs = residual3[o, k]
                for i in range(inner):
                    ys[i] = max((xs[i] - m) * a + s + rs[i], floor)
            else:
                for i in range(inner):
                    ys[i] = max((xs[i] - m) * a + s, floor)


@serial_kernel
def small_backward_sums(dy3, x3, y3, mean, count, sum_dy, sum_dy_xmu):
    """Per-kept-index count, sum(g) and sum(g * (x - mean)), float64 outputs (kept,);
    ``g = dy3``, or 0 where ``y3 <= 0`` (ReLU mask) when ``y3`` is not None.  Column sums
    folded per kept index, as :func:`small_moments`."""
    outer, kept, inner = x3.shape
    zero = np.zeros(1, dy3.dtype)[0]
    cols = kept * inner
    x2 = x3.reshape(outer, cols)
    g2 = dy3.reshape(outer, cols)
    column_mean = np.empty(cols)
    for k in range(kept):
        column_mean[k * inner:(k + 1) * inner] = np.float64(mean[k])
    s1 = np.zeros(cols)
    s2 = np.zeros(cols)
    if y3 is not None:
        y2 = y3.reshape(outer, cols)
        for o in range(outer):
            xr, gr, yr = x2[o], g2[o], y2[o]
            for j in range(cols):
                g = np.float64(masked(gr[j], yr[j], zero))
                s1[j] += g
                s2[j] += g * (np.float64(xr[j]) - column_mean[j])
    else:
        for o in range(outer):
            xr, gr = x2[o], g2[o]
            for j in range(cols):
                g = np.float64(gr[j])
                s1[j] += g
                s2[j] += g * (np.float64(xr[j]) - column_mean[j])
    for k in range(kept):
        a = 0.0
        b = 0.0
        for j in range(k * inner, (k + 1) * inner):  # each kept index's columns, in order
            a += s1[j]
            b += s2[j]
        count[k] = outer * inner
        sum_dy[k] = a
        sum_dy_xmu[k] = b


@serial_kernel
def small_backward_apply(dy3, x3, y3, center, dy_scale, x_scale, shift, dx3, g3):
    """dx3 = g * dy_scale[k] + (x3 - center[k]) * x_scale[k] + shift[k]; ``g = dy3``, or
    0 where ``y3 <= 0`` when ``y3`` is not None; ``g3``, when not None (only with ``y3``),
    receives ``g``.  Rows (``inner == 1``) run as C-contiguous (outer, kept) rows."""
    outer, kept, inner = x3.shape
    zero = np.zeros(1, dx3.dtype)[0]
    if inner == 1:
        x2 = x3.reshape(outer, kept)
        g2 = dy3.reshape(outer, kept)
        d2 = dx3.reshape(outer, kept)
        if g3 is not None:
            y2 = y3.reshape(outer, kept)
            o2 = g3.reshape(outer, kept)
            for o in range(outer):
                xr, gr, dr, yr, orow = x2[o], g2[o], d2[o], y2[o], o2[o]
                for k in range(kept):
                    g = masked(gr[k], yr[k], zero)
                    orow[k] = g
                    dr[k] = g * dy_scale[k] + (xr[k] - center[k]) * x_scale[k] + shift[k]
        elif y3 is not None:
            y2 = y3.reshape(outer, kept)
            for o in range(outer):
                xr, gr, dr, yr = x2[o], g2[o], d2[o], y2[o]
                for k in range(kept):
                    g = masked(gr[k], yr[k], zero)
                    dr[k] = g * dy_scale[k] + (xr[k] - center[k]) * x_scale[k] + shift[k]
        else:
            for o in range(outer):
                xr, gr, dr = x2[o], g2[o], d2[o]
                for k in range(kept):
                    dr[k] = gr[k] * dy_scale[k] + (xr[k] - center[k]) * x_scale[k] + shift[k]
        return
    for o in range(outer):
        for k in range(kept):
            xs = x3[o, k]
            gs = dy3[o, k]
            ds = dx3[o, k]
            m = center[k]
            a = dy_scale[k]
            bx = x_scale[k]
            s = shift[k]
            if g3 is not None:
                ms = y3[o, k]
                os = g3[o, k]
                for i in range(inner):
                    g = masked(gs[i], ms[i], zero)
                    os[i] = g
                    ds[i] = g * a + (xs[i] - m) * bx + s
            elif y3 is not None:
                ms = y3[o, k]
                for i in range(inner):
                    g = masked(gs[i], ms[i], zero)
                    ds[i] = g * a + (xs[i] - m) * bx + s
            else:
                for i in range(inner):
                    ds[i] = gs[i] * a + (xs[i] - m) * bx + s

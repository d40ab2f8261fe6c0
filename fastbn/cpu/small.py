"""Serial kernels for small tensors, where a parallel launch costs more than the work.

A tensor of a few thousand values is reduced and normalized in microseconds by one
thread; starting a parallel region costs several, and beside another runtime's thread
pool (PyTorch's OpenMP) far more.  Up to :data:`SMALL_SIZE` values the stages run these
kernels instead of the planes and rows ones.

Every kernel takes the C-contiguous ``(outer, kept, inner)`` view of
:mod:`fastbn.geometry`; when ``inner == 1`` (rows) the kept axis is the vector loop.
Data arrays are kernel views: loads through ``widen``, stores through ``narrow``
(:mod:`fastbn.half`; no-ops for float32/float64).
"""

import numpy as np

from ..algebra import shifted_moments
from ..half import narrow, widen
from .epilogue import masked
from ._jit import serial_kernel

#: Tensors with at most this many values run serially.  Measured (float32, 2 threads,
#: best of 7, this 2-core machine while another process ran): at 131072 values
#: ((16, 32, 16, 16) NCHW, (256, 512)) the serial passes took 42-125 us against
#: 124-23000 us for the parallel kernels, whose regions wait for a descheduled thread;
#: at 524288 values the parallel ones led by up to 1.4x on NCHW and trailed on NHWC.
SMALL_SIZE = 1 << 17


@serial_kernel
def small_moments(x3, count, mean, m2):
    """Per-kept-index (count, mean, M2) of x3 (outer, kept, inner), float64 outputs (kept,).

    Read as C-contiguous rows of ``kept * inner`` columns, each column summing its own
    shifted values (the loop over columns vectorizes without reassociation; a 3-D
    strided view ran scalar, ~3x slower), four rows per sweep in a fixed pairwise order
    (measured, float32, one thread: (256, 64) 7.7 us against 10.2 us row by row,
    (4096, 8) 49 us against 87 us), then each kept index adds its ``inner`` columns in
    order.  Strict IEEE arithmetic in a fixed order: a reassociated sum would
    vectorize differently where LLVM inlines it (the one-call passes of
    :mod:`fastbn.cpu.fused`), and they must equal the stages bit for bit.
    """
    outer, kept, inner = x3.shape
    cols = kept * inner
    x2 = x3.reshape(outer, cols)
    pivot = np.empty(kept)
    column_pivot = np.empty(cols)
    for k in range(kept):
        pivot[k] = widen(x2[0, k * inner])
        for i in range(inner):
            column_pivot[k * inner + i] = pivot[k]
    s1 = np.zeros(cols)
    s2 = np.zeros(cols)
    # Four rows per sweep, added pairwise: a quarter of the accumulator loads and stores.
    quads = outer // 4 * 4
    for o in range(0, quads, 4):
        r0, r1, r2, r3 = x2[o], x2[o + 1], x2[o + 2], x2[o + 3]
        for j in range(cols):
            p = column_pivot[j]
            d0 = np.float64(widen(r0[j])) - p
            d1 = np.float64(widen(r1[j])) - p
            d2 = np.float64(widen(r2[j])) - p
            d3 = np.float64(widen(r3[j])) - p
            s1[j] += (d0 + d1) + (d2 + d3)
            s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for o in range(quads, outer):
        row = x2[o]
        for j in range(cols):
            d = np.float64(widen(row[j])) - column_pivot[j]
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
                    yr[k] = narrow(max((widen(xr[k]) - center[k]) * scale[k] + shift[k] + widen(rr[k]), floor),
                                   yr.dtype)
        else:
            for o in range(outer):
                xr, yr = x2[o], y2[o]
                for k in range(kept):
                    yr[k] = narrow(max((widen(xr[k]) - center[k]) * scale[k] + shift[k], floor), yr.dtype)
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
                    ys[i] = narrow(max((widen(xs[i]) - m) * a + s + widen(rs[i]), floor), ys.dtype)
            else:
                for i in range(inner):
                    ys[i] = narrow(max((widen(xs[i]) - m) * a + s, floor), ys.dtype)


@serial_kernel
def small_backward_sums(dy3, x3, y3, mean, count, sum_dy, sum_dy_xmu):
    """Per-kept-index count, sum(g) and sum(g * (x - mean)), float64 outputs (kept,);
    ``g = dy3``, or 0 where ``y3 <= 0`` (ReLU mask) when ``y3`` is not None.  Column sums
    folded per kept index, as :func:`small_moments`."""
    outer, kept, inner = x3.shape
    zero = widen(np.zeros(1, dy3.dtype)[0])
    cols = kept * inner
    x2 = x3.reshape(outer, cols)
    g2 = dy3.reshape(outer, cols)
    column_mean = np.empty(cols)
    for k in range(kept):
        for i in range(inner):
            column_mean[k * inner + i] = np.float64(mean[k])
    s1 = np.zeros(cols)
    s2 = np.zeros(cols)
    if y3 is not None:
        y2 = y3.reshape(outer, cols)
        for o in range(outer):
            xr, gr, yr = x2[o], g2[o], y2[o]
            for j in range(cols):
                g = np.float64(masked(widen(gr[j]), widen(yr[j]), zero))
                s1[j] += g
                s2[j] += g * (np.float64(widen(xr[j])) - column_mean[j])
    else:
        quads = outer // 4 * 4  # four rows per sweep, as small_moments
        for o in range(0, quads, 4):
            xa, xb, xc, xd = x2[o], x2[o + 1], x2[o + 2], x2[o + 3]
            ga, gb, gc, gd = g2[o], g2[o + 1], g2[o + 2], g2[o + 3]
            for j in range(cols):
                m = column_mean[j]
                a = np.float64(widen(ga[j]))
                b = np.float64(widen(gb[j]))
                c = np.float64(widen(gc[j]))
                d = np.float64(widen(gd[j]))
                s1[j] += (a + b) + (c + d)
                s2[j] += ((a * (np.float64(widen(xa[j])) - m) + b * (np.float64(widen(xb[j])) - m))
                          + (c * (np.float64(widen(xc[j])) - m) + d * (np.float64(widen(xd[j])) - m)))
        for o in range(quads, outer):
            xr, gr = x2[o], g2[o]
            for j in range(cols):
                g = np.float64(widen(gr[j]))
                s1[j] += g
                s2[j] += g * (np.float64(widen(xr[j])) - column_mean[j])
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
    zero = widen(np.zeros(1, dx3.dtype)[0])
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
                    g = masked(widen(gr[k]), widen(yr[k]), zero)
                    orow[k] = narrow(g, orow.dtype)
                    dr[k] = narrow(g * dy_scale[k] + (widen(xr[k]) - center[k]) * x_scale[k] + shift[k], dr.dtype)
        elif y3 is not None:
            y2 = y3.reshape(outer, kept)
            for o in range(outer):
                xr, gr, dr, yr = x2[o], g2[o], d2[o], y2[o]
                for k in range(kept):
                    g = masked(widen(gr[k]), widen(yr[k]), zero)
                    dr[k] = narrow(g * dy_scale[k] + (widen(xr[k]) - center[k]) * x_scale[k] + shift[k], dr.dtype)
        else:
            for o in range(outer):
                xr, gr, dr = x2[o], g2[o], d2[o]
                for k in range(kept):
                    dr[k] = narrow(widen(gr[k]) * dy_scale[k] + (widen(xr[k]) - center[k]) * x_scale[k] + shift[k],
                                   dr.dtype)
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
                    g = masked(widen(gs[i]), widen(ms[i]), zero)
                    os[i] = narrow(g, os.dtype)
                    ds[i] = narrow(g * a + (widen(xs[i]) - m) * bx + s, ds.dtype)
            elif y3 is not None:
                ms = y3[o, k]
                for i in range(inner):
                    g = masked(widen(gs[i]), widen(ms[i]), zero)
                    ds[i] = narrow(g * a + (widen(xs[i]) - m) * bx + s, ds.dtype)
            else:
                for i in range(inner):
                    ds[i] = narrow(widen(gs[i]) * a + (widen(xs[i]) - m) * bx + s, ds.dtype)

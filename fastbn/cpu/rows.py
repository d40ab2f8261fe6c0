"""Row kernels: ``x`` viewed as (M, W) C-contiguous rows of W "columns".

Channel-last memory (NHWC) is the natural case: a row is one pixel, a column one channel.
The host also runs two other views through these kernels, described to them by
``chan`` (W,), the channel of every column:

- few channels: ``R`` consecutive rows folded into one row of ``R * C`` columns (a free
  reshape), ``chan[j] = j % C``, which keeps the vector lanes busy;
- channel-first memory with small planes (NCHW, S pixels): rows are samples, W = C * S,
  ``chan[j] = j // S``; a plane of 49 values is too short a loop to vectorize well, a row
  of C * 49 is not.

Per-channel vectors (center, scale, ...) arrive expanded to one value per column.  The
inner loop always runs over the columns of one row: every column has its own vector lane
and float64 accumulator.  Reductions work on (row chunk, column block) tiles; column
blocks hold whole channels (``plans`` aligns them), so a tile's sums fold into its own
channels' per-chunk partials with no race and in a fixed order.  Rows are consumed two
at a time, which halves the accumulator loads and stores per value.

Data arrays are kernel views: loads through ``widen``, stores through ``narrow``
(:mod:`fastbn.half`; no-ops for float32/float64).
"""

import numpy as np
from numba import prange

from ._jit import parallel_kernel
from ..algebra import shifted_moments
from ..half import narrow, widen
from .epilogue import masked


@parallel_kernel
def rows_moments(x2, chan, pivot, col_pivot, rows_per_chunk, cols_per_block, part_mean, part_m2):
    """Per-(row chunk, channel) (mean, M2) of x2 (M, W); outputs (row_chunks, C) float64.

    ``pivot`` (C,) float64 is a value of each channel's data, ``col_pivot`` (W,) the same
    per column; sums are shifted by it (see :func:`fastbn.algebra.shifted_moments`).
    """
    num_rows, width = x2.shape
    x1 = x2.reshape(num_rows * width)
    num_chunks = part_mean.shape[0]
    num_blocks = (width + cols_per_block - 1) // cols_per_block
    for item in prange(num_chunks * num_blocks):
        i = item // num_blocks
        j = item - i * num_blocks
        r0 = i * rows_per_chunk
        rows = min(rows_per_chunk, num_rows - r0)
        c0 = j * cols_per_block
        cols = min(cols_per_block, width - c0)
        k = col_pivot[c0:c0 + cols]
        s1 = np.zeros(cols)
        s2 = np.zeros(cols)
        r = 0
        while r + 1 < rows:
            start = (r0 + r) * width + c0
            xa = x1[start:start + cols]
            xb = x1[start + width:start + width + cols]
            for c in range(cols):
                da = np.float64(widen(xa[c])) - k[c]
                db = np.float64(widen(xb[c])) - k[c]
                s1[c] += da + db
                s2[c] += da * da + db * db
            r += 2
        if r < rows:
            start = (r0 + r) * width + c0
            xa = x1[start:start + cols]
            for c in range(cols):
                da = np.float64(widen(xa[c])) - k[c]
                s1[c] += da
                s2[c] += da * da
        ch_lo = chan[c0]
        num_ch = chan[c0 + cols - 1] + 1 - ch_lo
        t1 = np.zeros(num_ch)
        t2 = np.zeros(num_ch)
        for c in range(cols):
            t1[chan[c0 + c] - ch_lo] += s1[c]
            t2[chan[c0 + c] - ch_lo] += s2[c]
        count = rows * (cols // num_ch)
        for ch in range(num_ch):
            mean, m2 = shifted_moments(pivot[ch_lo + ch], t1[ch], t2[ch], count)
            part_mean[i, ch_lo + ch] = mean
            part_m2[i, ch_lo + ch] = m2


@parallel_kernel
def rows_apply(x2, residual2, center, scale, shift, floor, rows_per_chunk, y2):
    """y2 = max((x2 - center) * scale + shift + residual2, floor), row by row, for x2, y2 (M, W).

    Vectors (W,) and ``floor`` (-inf or 0: no activation or ReLU) in the compute dtype;
    ``residual2`` like x2, or None for no residual (compiled without its loop).
    """
    num_rows = x2.shape[0]
    for i in prange((num_rows + rows_per_chunk - 1) // rows_per_chunk):
        r0 = i * rows_per_chunk
        xs = x2[r0:min(r0 + rows_per_chunk, num_rows)]
        ys = y2[r0:min(r0 + rows_per_chunk, num_rows)]
        for r in range(xs.shape[0]):
            xr = xs[r]
            yr = ys[r]
            if residual2 is not None:
                rr = residual2[r0 + r]
                for c in range(xr.size):
                    yr[c] = narrow(max((widen(xr[c]) - center[c]) * scale[c] + shift[c] + widen(rr[c]), floor),
                                   yr.dtype)
            else:
                for c in range(xr.size):
                    yr[c] = narrow(max((widen(xr[c]) - center[c]) * scale[c] + shift[c], floor), yr.dtype)


@parallel_kernel
def rows_backward_sums(dy2, x2, y2, chan, col_mean, rows_per_chunk, cols_per_block,
                       part_sum_dy, part_sum_dy_xmu):
    """Per-(row chunk, channel) sums of g and g * (x - mean) in float64; outputs (row_chunks, C).

    ``col_mean`` (W,) float64 is each column's channel mean.  ``g = dy2``, or with the
    ReLU mask ``g = 0 where y2 <= 0 else dy2`` when ``y2`` (the forward's output, like
    x2) is not None (None compiles without the mask).
    """
    num_rows, width = x2.shape
    x1 = x2.reshape(num_rows * width)
    g1 = dy2.reshape(num_rows * width)
    zero = widen(np.zeros(1, dy2.dtype)[0])
    y1 = x1 if y2 is None else y2.reshape(num_rows * width)  # x1: a placeholder, never read
    num_chunks = part_sum_dy.shape[0]
    num_blocks = (width + cols_per_block - 1) // cols_per_block
    for item in prange(num_chunks * num_blocks):
        i = item // num_blocks
        j = item - i * num_blocks
        r0 = i * rows_per_chunk
        rows = min(rows_per_chunk, num_rows - r0)
        c0 = j * cols_per_block
        cols = min(cols_per_block, width - c0)
        m = col_mean[c0:c0 + cols]
        s1 = np.zeros(cols)
        s2 = np.zeros(cols)
        if y2 is not None:
            r = 0
            while r + 1 < rows:
                start = (r0 + r) * width + c0
                xa = x1[start:start + cols]
                xb = x1[start + width:start + width + cols]
                ga = g1[start:start + cols]
                gb = g1[start + width:start + width + cols]
                ya = y1[start:start + cols]
                yb = y1[start + width:start + width + cols]
                for c in range(cols):
                    a = np.float64(masked(widen(ga[c]), widen(ya[c]), zero))
                    b = np.float64(masked(widen(gb[c]), widen(yb[c]), zero))
                    s1[c] += a + b
                    s2[c] += a * (np.float64(widen(xa[c])) - m[c]) + b * (np.float64(widen(xb[c])) - m[c])
                r += 2
            if r < rows:
                start = (r0 + r) * width + c0
                xa = x1[start:start + cols]
                ga = g1[start:start + cols]
                ya = y1[start:start + cols]
                for c in range(cols):
                    a = np.float64(masked(widen(ga[c]), widen(ya[c]), zero))
                    s1[c] += a
                    s2[c] += a * (np.float64(widen(xa[c])) - m[c])
        else:
            r = 0
            while r + 1 < rows:
                start = (r0 + r) * width + c0
                xa = x1[start:start + cols]
                xb = x1[start + width:start + width + cols]
                ga = g1[start:start + cols]
                gb = g1[start + width:start + width + cols]
                for c in range(cols):
                    a = np.float64(widen(ga[c]))
                    b = np.float64(widen(gb[c]))
                    s1[c] += a + b
                    s2[c] += a * (np.float64(widen(xa[c])) - m[c]) + b * (np.float64(widen(xb[c])) - m[c])
                r += 2
            if r < rows:
                start = (r0 + r) * width + c0
                xa = x1[start:start + cols]
                ga = g1[start:start + cols]
                for c in range(cols):
                    a = np.float64(widen(ga[c]))
                    s1[c] += a
                    s2[c] += a * (np.float64(widen(xa[c])) - m[c])
        ch_lo = chan[c0]
        num_ch = chan[c0 + cols - 1] + 1 - ch_lo
        for ch in range(num_ch):
            part_sum_dy[i, ch_lo + ch] = 0.0
            part_sum_dy_xmu[i, ch_lo + ch] = 0.0
        for c in range(cols):
            part_sum_dy[i, chan[c0 + c]] += s1[c]
            part_sum_dy_xmu[i, chan[c0 + c]] += s2[c]


@parallel_kernel
def rows_backward_apply(dy2, x2, y2, center, dy_scale, x_scale, shift, rows_per_chunk, dx2, g2):
    """dx2 = g * dy_scale + (x2 - center) * x_scale + shift, row by row; vectors (W,) in the compute dtype.

    ``g = dy2``, or masked by ``y2 <= 0`` when ``y2`` is not None; ``g2``, when not
    None (only with ``y2``), receives ``g`` (the residual's gradient).
    """
    num_rows = x2.shape[0]
    zero = widen(np.zeros(1, dx2.dtype)[0])
    for i in prange((num_rows + rows_per_chunk - 1) // rows_per_chunk):
        r0 = i * rows_per_chunk
        xs = x2[r0:min(r0 + rows_per_chunk, num_rows)]
        gs = dy2[r0:min(r0 + rows_per_chunk, num_rows)]
        ds = dx2[r0:min(r0 + rows_per_chunk, num_rows)]
        for r in range(xs.shape[0]):
            xr = xs[r]
            gr = gs[r]
            dr = ds[r]
            if g2 is not None:
                yr = y2[r0 + r]
                orow = g2[r0 + r]
                for c in range(xr.size):
                    g = masked(widen(gr[c]), widen(yr[c]), zero)
                    orow[c] = narrow(g, orow.dtype)
                    dr[c] = narrow(g * dy_scale[c] + (widen(xr[c]) - center[c]) * x_scale[c] + shift[c], dr.dtype)
            elif y2 is not None:
                yr = y2[r0 + r]
                for c in range(xr.size):
                    g = masked(widen(gr[c]), widen(yr[c]), zero)
                    dr[c] = narrow(g * dy_scale[c] + (widen(xr[c]) - center[c]) * x_scale[c] + shift[c], dr.dtype)
            else:
                for c in range(xr.size):
                    dr[c] = narrow(widen(gr[c]) * dy_scale[c] + (widen(xr[c]) - center[c]) * x_scale[c] + shift[c],
                                   dr.dtype)

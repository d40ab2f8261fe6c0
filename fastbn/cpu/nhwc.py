"""Kernels for channel-last memory: ``x`` viewed as (M, C) rows, channels contiguous.

The inner loop runs over channels, so each channel has its own vector lane and
accumulator.  With few channels the driver first folds ``R`` consecutive rows into one
row of ``R * C`` "virtual channels" (a free reshape), which keeps the vector lanes busy;
the statistics of the R copies of a channel are merged afterwards.  Work items are
(row chunk, column block) tiles: rows ``[i * rows_per_chunk, ...)``, columns
``[j * cols_per_block, ...)``, so both tall-narrow and short-wide tensors use every thread.
"""

import numpy as np
from numba import prange

from ._jit import parallel_kernel
from .welford import shifted_moments


@parallel_kernel
def nhwc_stats_partials(x2, rows_per_chunk, cols_per_block, part_mean, part_m2):
    """Per-tile (mean, M2) of each column of x2 (M, C); outputs (row_chunks, C) float64."""
    num_rows, num_cols = x2.shape
    num_chunks = part_mean.shape[0]
    num_blocks = (num_cols + cols_per_block - 1) // cols_per_block
    for item in prange(num_chunks * num_blocks):
        i = item // num_blocks
        j = item - i * num_blocks
        r0 = i * rows_per_chunk
        c0 = j * cols_per_block
        tile = x2[r0:min(r0 + rows_per_chunk, num_rows), c0:min(c0 + cols_per_block, num_cols)]
        rows, cols = tile.shape
        k = tile[0].astype(np.float64)
        s1 = np.zeros(cols)
        s2 = np.zeros(cols)
        for r in range(rows):
            row = tile[r]
            for c in range(cols):
                d = np.float64(row[c]) - k[c]
                s1[c] += d
                s2[c] += d * d
        for c in range(cols):
            mean, m2 = shifted_moments(k[c], s1[c], s2[c], rows)
            part_mean[i, c0 + c] = mean
            part_m2[i, c0 + c] = m2


@parallel_kernel
def nhwc_scale_shift(x2, center, scale, shift, rows_per_chunk, y2):
    """y2 = (x2 - center) * scale + shift, row by row, for x2, y2 (M, C); vectors (C,) in x2's dtype."""
    num_rows = x2.shape[0]
    for i in prange((num_rows + rows_per_chunk - 1) // rows_per_chunk):
        r0 = i * rows_per_chunk
        xs = x2[r0:min(r0 + rows_per_chunk, num_rows)]
        ys = y2[r0:min(r0 + rows_per_chunk, num_rows)]
        for r in range(xs.shape[0]):
            xr = xs[r]
            yr = ys[r]
            for c in range(xr.size):
                yr[c] = (xr[c] - center[c]) * scale[c] + shift[c]


@parallel_kernel
def nhwc_backward_reduce(dy2, x2, mean, rows_per_chunk, part_sum_dy, part_sum_dy_xmu):
    """Per-chunk column sums of dy and dy * (x - mean) in float64; outputs (row_chunks, C)."""
    num_rows, num_cols = x2.shape
    for i in prange(part_sum_dy.shape[0]):
        r0 = i * rows_per_chunk
        xs = x2[r0:min(r0 + rows_per_chunk, num_rows)]
        gs = dy2[r0:min(r0 + rows_per_chunk, num_rows)]
        s1 = np.zeros(num_cols)
        s2 = np.zeros(num_cols)
        for r in range(xs.shape[0]):
            xr = xs[r]
            gr = gs[r]
            for c in range(num_cols):
                g = np.float64(gr[c])
                s1[c] += g
                s2[c] += g * (np.float64(xr[c]) - mean[c])
        part_sum_dy[i] = s1
        part_sum_dy_xmu[i] = s2


@parallel_kernel
def nhwc_backward_dx(dy2, x2, center, dy_scale, x_scale, shift, rows_per_chunk, dx2):
    """dx2 = dy2 * dy_scale + (x2 - center) * x_scale + shift, row by row; vectors in x2's dtype."""
    num_rows = x2.shape[0]
    for i in prange((num_rows + rows_per_chunk - 1) // rows_per_chunk):
        r0 = i * rows_per_chunk
        xs = x2[r0:min(r0 + rows_per_chunk, num_rows)]
        gs = dy2[r0:min(r0 + rows_per_chunk, num_rows)]
        ds = dx2[r0:min(r0 + rows_per_chunk, num_rows)]
        for r in range(xs.shape[0]):
            xr = xs[r]
            gr = gs[r]
            dr = ds[r]
            for c in range(xr.size):
                dr[c] = gr[c] * dy_scale[c] + (xr[c] - center[c]) * x_scale[c] + shift[c]

"""Row kernels with a leading independent axis: ``x3`` (N, S, C), each sample n a
channel-last (S, C) block with statistics and coefficients of its own per (n, c).

Channel-last group and instance norm keep (N, C): not one ``(outer, kept, inner)`` view,
so these kernels take the batch axis explicitly instead of a launch per sample (measured
(16, 128, 32, 32) float32, 2 threads, loaded machine: a launch per sample made the
forward 0.05x PyTorch).  Work items are (n, chunk of ``rows_per_chunk`` rows); the
channel loop is the contiguous, vectorized one.  Partials are per item, merged by the
caller in a fixed order (Chan merge for moments, sums for the backward).
"""

import numpy as np
from numba import prange

from ..algebra import shifted_moments
from ._jit import parallel_kernel


@parallel_kernel
def batched_rows_moments(x3, rows_per_chunk, part_mean, part_m2):
    """Per item (n, chunk) shifted-sum (mean, M2) per channel; outputs (N * chunks, C) float64."""
    num_n, num_rows, num_c = x3.shape
    chunks = (num_rows + rows_per_chunk - 1) // rows_per_chunk
    for item in prange(num_n * chunks):
        n = item // chunks
        lo = (item - n * chunks) * rows_per_chunk
        hi = min(lo + rows_per_chunk, num_rows)
        pivot = np.empty(num_c)
        s1 = np.zeros(num_c)
        s2 = np.zeros(num_c)
        first = x3[n, lo]
        for c in range(num_c):
            pivot[c] = np.float64(first[c])
        for r in range(lo, hi):
            row = x3[n, r]
            for c in range(num_c):
                d = np.float64(row[c]) - pivot[c]
                s1[c] += d
                s2[c] += d * d
        for c in range(num_c):
            part_mean[item, c], part_m2[item, c] = shifted_moments(pivot[c], s1[c], s2[c], hi - lo)


@parallel_kernel
def batched_rows_apply(x3, center, scale, shift, rows_per_chunk, y3):
    """y3[n, r, c] = (x3[n, r, c] - center[n, c]) * scale[n, c] + shift[n, c]; vectors (N, C)."""
    num_n, num_rows, num_c = x3.shape
    chunks = (num_rows + rows_per_chunk - 1) // rows_per_chunk
    for item in prange(num_n * chunks):
        n = item // chunks
        lo = (item - n * chunks) * rows_per_chunk
        m = center[n]
        a = scale[n]
        s = shift[n]
        for r in range(lo, min(lo + rows_per_chunk, num_rows)):
            xr = x3[n, r]
            yr = y3[n, r]
            for c in range(num_c):
                yr[c] = (xr[c] - m[c]) * a[c] + s[c]


@parallel_kernel
def batched_rows_backward_sums(dy3, x3, mean, rows_per_chunk, part_dy, part_dy_xmu):
    """Per item (n, chunk): sum(dy) and sum(dy * (x - mean[n, c])) per channel, float64
    outputs (N * chunks, C); mean (N, C) float64."""
    num_n, num_rows, num_c = x3.shape
    chunks = (num_rows + rows_per_chunk - 1) // rows_per_chunk
    for item in prange(num_n * chunks):
        n = item // chunks
        lo = (item - n * chunks) * rows_per_chunk
        mu = mean[n]
        s1 = part_dy[item]
        s2 = part_dy_xmu[item]
        for c in range(num_c):
            s1[c] = 0.0
            s2[c] = 0.0
        for r in range(lo, min(lo + rows_per_chunk, num_rows)):
            xr = x3[n, r]
            gr = dy3[n, r]
            for c in range(num_c):
                g = np.float64(gr[c])
                s1[c] += g
                s2[c] += g * (np.float64(xr[c]) - mu[c])


@parallel_kernel
def batched_rows_backward_apply(dy3, x3, center, dy_scale, x_scale, shift, rows_per_chunk, dx3):
    """dx3 = dy3 * dy_scale[n, c] + (x3 - center[n, c]) * x_scale[n, c] + shift[n, c]."""
    num_n, num_rows, num_c = x3.shape
    chunks = (num_rows + rows_per_chunk - 1) // rows_per_chunk
    for item in prange(num_n * chunks):
        n = item // chunks
        lo = (item - n * chunks) * rows_per_chunk
        m = center[n]
        a = dy_scale[n]
        b = x_scale[n]
        s = shift[n]
        for r in range(lo, min(lo + rows_per_chunk, num_rows)):
            xr = x3[n, r]
            gr = dy3[n, r]
            dr = dx3[n, r]
            for c in range(num_c):
                dr[c] = gr[c] * a[c] + (xr[c] - m[c]) * b[c] + s[c]

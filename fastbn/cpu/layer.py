"""Elementwise and reduction kernels of layer norm, whose affine parameters are per
normalized element (column k of the (M, K) view) while its statistics are per row m.

The row statistics themselves are those of :mod:`fastbn.cpu.stages` on the ``(1, M, K)``
planes view, and the per-row coefficients those of :mod:`fastbn.cpu.channels`; these
kernels add the per-column weight and bias.  Work items are chunks of ``rows_per_chunk``
whole rows, so the column loop is the contiguous, vectorized one.
"""

import numpy as np
from numba import prange

from ._jit import parallel_kernel


@parallel_kernel
def layer_apply(x2, center, scale, shift, weight, bias, rows_per_chunk, y2):
    """y2[m, k] = ((x2[m, k] - center[m]) * scale[m] + shift[m]) * weight[k] + bias[k].

    x2, y2: (M, K); center, scale, shift: (M,); weight, bias: (K,); all in the compute dtype.
    """
    num_rows = x2.shape[0]
    for chunk in prange((num_rows + rows_per_chunk - 1) // rows_per_chunk):
        for m in range(chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, num_rows)):
            xr = x2[m]
            yr = y2[m]
            c = center[m]
            a = scale[m]
            t = shift[m]
            for k in range(xr.size):
                yr[k] = ((xr[k] - c) * a + t) * weight[k] + bias[k]


@parallel_kernel
def layer_backward_sums(dy2, x2, mean, invstd, weight, rows_per_chunk, sum_g, sum_g_xmu, part_dweight, part_dbias):
    """One pass over dy2, x2 (M, K): per row, with g = dy * weight[k], ``sum_g[m] = sum(g)``
    and ``sum_g_xmu[m] = sum(g * (x - mean[m]))`` (float64 (M,)); per chunk of rows the
    column partials ``part_dweight[p, k] = sum(dy * (x - mean) * invstd)`` and
    ``part_dbias[p, k] = sum(dy)`` (float64 (P, K)).  mean, invstd: (M,) float64."""
    num_rows, width = x2.shape
    for chunk in prange((num_rows + rows_per_chunk - 1) // rows_per_chunk):
        dw = part_dweight[chunk]
        db = part_dbias[chunk]
        for k in range(width):
            dw[k] = 0.0
            db[k] = 0.0
        for m in range(chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, num_rows)):
            xr = x2[m]
            gr = dy2[m]
            mu = mean[m]
            r = invstd[m]
            s1 = 0.0
            s2 = 0.0
            for k in range(width):
                d = np.float64(gr[k])
                xmu = np.float64(xr[k]) - mu
                g = d * np.float64(weight[k])
                s1 += g
                s2 += g * xmu
                dw[k] += d * (xmu * r)
                db[k] += d
            sum_g[m] = s1
            sum_g_xmu[m] = s2


@parallel_kernel
def layer_backward_apply(dy2, x2, weight, center, dy_scale, x_scale, shift, rows_per_chunk, dx2):
    """dx2[m, k] = dy2[m, k] * weight[k] * dy_scale[m] + (x2[m, k] - center[m]) * x_scale[m] + shift[m]."""
    num_rows = x2.shape[0]
    for chunk in prange((num_rows + rows_per_chunk - 1) // rows_per_chunk):
        for m in range(chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, num_rows)):
            xr = x2[m]
            gr = dy2[m]
            dr = dx2[m]
            c = center[m]
            a = dy_scale[m]
            b = x_scale[m]
            t = shift[m]
            for k in range(xr.size):
                dr[k] = (gr[k] * weight[k]) * a + (xr[k] - c) * b + t

"""Layer-norm kernels: per row m of the (M, K) view, statistics and the elementwise pass
in one sweep while the row is in cache, with per-column (k) weight and bias.

A row (K values, a few KB) fits in L1, so reading it once for its statistics and again
for ``y`` costs one pass over memory, against two for the batch-norm pipeline's separate
statistics and apply kernels (measured on (4096, 1024) float32, 2 threads: statistics
kernel 1.9x the time of the apply kernel, so the separate passes lost to PyTorch's
row-fused kernel).  The statistics (shifted sums, :func:`fastbn.algebra.shifted_moments`)
and the coefficients (:func:`fastbn.algebra.forward_channel`,
:func:`fastbn.algebra.backward_channel`) are the algebra batch norm uses; only the row
loop is here.  Work items are chunks of ``rows_per_chunk`` whole rows.
"""

import numpy as np
from numba import prange

from ..algebra import backward_channel, forward_channel, population_variance, shifted_moments
from ._jit import parallel_kernel


@parallel_kernel
def layer_forward(x2, weight, bias, eps, big, rows_per_chunk, save_mean, save_invstd, center, scale, shift, y2):
    """y2[m, k] = ((x2[m, k] - center[m]) * scale[m] + shift[m]) * weight[k] + bias[k].

    x2, y2: (M, K); weight, bias: (K,) in the compute dtype (largest finite value ``big``).
    Outputs per row: save_mean, save_invstd (M,) float64; center, scale, shift (M,) in the
    compute dtype (the row's :func:`forward_channel` coefficients, weight 1 and bias 0).
    """
    num_rows, width = x2.shape
    for chunk in prange((num_rows + rows_per_chunk - 1) // rows_per_chunk):
        for m in range(chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, num_rows)):
            xr = x2[m]
            pivot = np.float64(xr[0])
            s1 = 0.0
            s2 = 0.0
            for k in range(width):
                d = np.float64(xr[k]) - pivot
                s1 += d
                s2 += d * d
            mean, m2 = shifted_moments(pivot, s1, s2, width)
            # The row's own coefficients (weight 1, bias 0: the (K,) affine follows per
            # element); ``scale`` stands in for the unused (M,) weight and bias vectors.
            forward_channel(m, mean, population_variance(width, m2), scale, scale, False, False, eps, big,
                            save_mean, save_invstd, center, scale, shift)
            yr = y2[m]
            c = center[m]
            a = scale[m]
            t = shift[m]
            for k in range(width):
                yr[k] = ((xr[k] - c) * a + t) * weight[k] + bias[k]


@parallel_kernel
def layer_backward(dy2, x2, mean, invstd, weight, big, rows_per_chunk, center, dy_scale, x_scale, shift,
                   part_dweight, part_dbias, dx2):
    """dx2 of layer norm, one sweep: per row, with g = dy * weight[k], the sums
    ``sum(g)`` and ``sum(g * (x - mean[m]))`` (float64), the row's
    :func:`backward_channel` coefficients (center, dy_scale, x_scale, shift: (M,) compute
    dtype scratch), then ``dx = g * dy_scale + (x - center) * x_scale + shift``.  Per chunk
    of rows the column partials ``part_dweight[p, k] = sum(dy * (x - mean) * invstd)`` and
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
            backward_channel(m, np.float64(width), s1, s2, mu, r, dy_scale, False, True, big,
                             center, dy_scale, x_scale, shift)
            dr = dx2[m]
            c = center[m]
            a = dy_scale[m]
            b = x_scale[m]
            t = shift[m]
            for k in range(width):
                dr[k] = (gr[k] * weight[k]) * a + (xr[k] - c) * b + t

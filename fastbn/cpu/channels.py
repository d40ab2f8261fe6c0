"""Per-channel kernels: merges of partial statistics and the coefficients of the
elementwise passes, each a loop over channels around one function of
:mod:`fastbn.algebra` (the formulas the CUDA backend runs too).

O(C) work: compiled without ``parallel`` (a parallel launch costs more than the loop),
except the merge of a reduction's partials, which is O(partials * C).
"""

import numpy as np
from numba import prange

from ..algebra import (backward_channel, chan_merge, forward_channel, parameter_gradients,
                       population_variance, running_update)
from ._jit import parallel_kernel, serial_kernel

#: Channels per work item of the partials merge.
MERGE_BLOCK = 256


@parallel_kernel
def merge_partials(counts, part_mean, part_m2, count, mean, m2):
    """Merge per-chunk partials into per-channel (count, mean, M2).

    counts: (P,) float64, values per channel in each partial (the same for every
    channel); part_mean, part_m2: (P, C) float64; count, mean, m2: (C,) float64 outputs.
    Partials are merged in order p = 0, 1, ...; the channel loop is the inner, vector one.
    """
    num_parts, num_channels = part_mean.shape
    for blk in prange((num_channels + MERGE_BLOCK - 1) // MERGE_BLOCK):
        c0 = blk * MERGE_BLOCK
        width = min(MERGE_BLOCK, num_channels - c0)
        n = count[c0:c0 + width]
        m = mean[c0:c0 + width]
        s = m2[c0:c0 + width]
        for c in range(width):
            n[c] = 0.0
            m[c] = 0.0
            s[c] = 0.0
        for p in range(num_parts):
            n_b = counts[p]
            pm = part_mean[p, c0:c0 + width]
            p2 = part_m2[p, c0:c0 + width]
            for c in range(width):
                n[c], m[c], s[c] = chan_merge(n[c], m[c], s[c], n_b, pm[c], p2[c])


@serial_kernel
def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b, count, mean, m2):
    """(count, mean, M2) of the union of two per-channel moments; all (C,) float64."""
    for c in range(mean.size):
        count[c], mean[c], m2[c] = chan_merge(count_a[c], mean_a[c], m2_a[c], count_b[c], mean_b[c], m2_b[c])


@serial_kernel
def forward_coefficients(count, mean, second, from_moments, weight, bias, use_weight, use_bias, eps, big,
                         momentum, running_mean, running_var, update_running,
                         save_mean, save_invstd, center, scale, shift):
    """Per channel: saved statistics, the running-statistics update and the apply coefficients.

    ``second`` is M2 when ``from_moments`` (batch statistics over ``count`` values,
    var = M2 / count), else the variance itself (running statistics; ``count`` unused).
    Absent optional vectors are passed as placeholders of the right dtype and read only
    under their flag.  ``save_mean`` may be ``mean`` itself.  See
    :func:`fastbn.algebra.forward_channel` and :func:`fastbn.algebra.running_update`.
    """
    # Flags are tested outside the channel loops: a branch around array accesses inside
    # a loop keeps Numba from pruning the arrays' reference counting (see fastbn.algebra).
    if from_moments and update_running:
        for c in range(mean.size):
            n = np.float64(count[c])
            running_update(c, n, np.float64(mean[c]), population_variance(n, np.float64(second[c])), momentum,
                           running_mean, running_var)
    if from_moments:
        for c in range(mean.size):
            var = population_variance(np.float64(count[c]), np.float64(second[c]))
            forward_channel(c, np.float64(mean[c]), var, weight, bias, use_weight, use_bias, eps, big,
                            save_mean, save_invstd, center, scale, shift)
    else:
        for c in range(mean.size):
            forward_channel(c, np.float64(mean[c]), np.float64(second[c]), weight, bias, use_weight, use_bias,
                            eps, big, save_mean, save_invstd, center, scale, shift)


@serial_kernel
def backward_coefficients(count, sum_dy, sum_dy_xmu, mean, invstd, weight, use_weight, training, big,
                          center, dy_scale, x_scale, shift):
    """Per channel: the coefficients of the dx pass (:func:`fastbn.algebra.backward_channel`)."""
    for c in range(invstd.size):
        backward_channel(c, count[c], sum_dy[c], sum_dy_xmu[c], np.float64(mean[c]), np.float64(invstd[c]),
                         weight, use_weight, training, big, center, dy_scale, x_scale, shift)


@serial_kernel
def weight_bias_gradients(sum_dy, sum_dy_xmu, invstd, dweight, dbias):
    """Per channel: dweight and dbias (:func:`fastbn.algebra.parameter_gradients`)."""
    for c in range(invstd.size):
        parameter_gradients(c, sum_dy[c], sum_dy_xmu[c], np.float64(invstd[c]), dweight, dbias)

"""Per-group kernels of group and instance norm: per-(n, c) statistics (from the planes
or batched rows kernels, :mod:`fastbn.cpu.norms`) merged into per-(n, g) ones, and the
per-(n, c) coefficients of the elementwise passes from them.

Index conventions: per-(n, c) vectors have N * C entries (index ``n * C + c``), per-(n, g)
ones N * G (index ``n * G + g``); with ``group_size = C // G`` the group of entry ``i`` is
``i // group_size``.  Weight and bias are per channel c.  Every formula is one of
:mod:`fastbn.algebra` (the merge, the coefficients, the running update); these loops only
route indices.  O(N * C) work: serial kernels.
"""

import numpy as np

from ..algebra import (backward_channel, chan_merge, forward_channel, parameter_gradients, population_variance,
                       running_update, saturate)
from ._jit import serial_kernel


@serial_kernel
def merge_groups(count, mean, m2, group_size, group_count, group_mean, group_m2):
    """Chan merge of each run of ``group_size`` consecutive (count, mean, M2) entries.

    count, mean, m2: (N * C,) float64; group_count, group_mean, group_m2: (N * G,) outputs.
    """
    for g in range(group_mean.size):
        n_a = 0.0
        m_a = 0.0
        s_a = 0.0
        for i in range(g * group_size, (g + 1) * group_size):
            n_a, m_a, s_a = chan_merge(n_a, m_a, s_a, count[i], mean[i], m2[i])
        group_count[g] = n_a
        group_mean[g] = m_a
        group_m2[g] = s_a


@serial_kernel
def group_forward_coefficients(count, mean, m2, weight, bias, use_weight, use_bias, eps, big, momentum,
                               running_mean, running_var, update_running, save_invstd, center, scale, shift):
    """Per-(n, c) coefficients of ``y = (x - center) * scale + shift`` from per-(n, g) moments.

    count, mean, m2: (N * G,) float64; weight, bias: (C,) read under their flags;
    running_mean, running_var: (N * C,) float64 copies of the (C,) running statistics per
    sample, updated per (n, c) when ``update_running`` (instance norm: the caller averages
    them over n); save_invstd: (N * G,) output; center, scale, shift: (N * C,) outputs in
    the compute dtype, whose largest finite value is ``big``.
    """
    num_channels = weight.size
    group_size = center.size // mean.size
    row_mean = np.empty(num_channels)
    row_invstd = np.empty(num_channels)
    for lo in range(0, center.size, num_channels):
        hi = lo + num_channels
        row_center, row_scale, row_shift = center[lo:hi], scale[lo:hi], shift[lo:hi]
        if update_running:  # outside the channel loop (see fastbn.algebra)
            row_running_mean, row_running_var = running_mean[lo:hi], running_var[lo:hi]
            for c in range(num_channels):
                g = (lo + c) // group_size
                running_update(c, count[g], mean[g], population_variance(count[g], m2[g]), momentum, row_running_mean,
                               row_running_var)
        for c in range(num_channels):
            g = (lo + c) // group_size
            forward_channel(c, mean[g], population_variance(count[g], m2[g]), weight, bias, use_weight, use_bias,
                            eps, big, row_mean, row_invstd, row_center, row_scale, row_shift)
            save_invstd[g] = row_invstd[c]


@serial_kernel
def group_backward_coefficients(count, sum_dy, sum_dy_xmu, mean, invstd, weight, use_weight, big,
                                dweight, dbias, center, dy_scale, x_scale, shift):
    """Per-(n, c) coefficients of ``dx = dy * dy_scale + (x - center) * x_scale + shift``.

    count, mean, invstd: (N * G,) float64 (the forward's); sum_dy, sum_dy_xmu: (N * C,)
    float64 per-(n, c) sums of dy and dy * (x - mean).  With g = weight * dy the group's
    gradient through its statistics needs sum(g) and sum(g * (x - mean)) over the group,
    plain sums of the per-(n, c) ones times weight[c]; :func:`backward_channel` then
    gives the group's coefficients (its own weight factor off), and ``dy_scale`` gets
    the channel's weight.  dweight, dbias: (C,) float64 outputs, the per-(n, c)
    :func:`parameter_gradients` summed over n.
    """
    num_channels = dweight.size
    group_size = center.size // mean.size
    group_dy = np.zeros(mean.size)
    group_dy_xmu = np.zeros(mean.size)
    for i in range(center.size):
        w = np.float64(weight[i % num_channels]) if use_weight else 1.0
        group_dy[i // group_size] += w * sum_dy[i]
        group_dy_xmu[i // group_size] += w * sum_dy_xmu[i]
    dweight[:] = 0.0
    dbias[:] = 0.0
    row_dweight = np.empty(num_channels)
    row_dbias = np.empty(num_channels)
    for lo in range(0, center.size, num_channels):
        hi = lo + num_channels
        for c in range(num_channels):
            i = lo + c
            g = i // group_size
            backward_channel(c, count[g], group_dy[g], group_dy_xmu[g], mean[g], invstd[g], weight, False, True,
                             big, center[lo:hi], dy_scale[lo:hi], x_scale[lo:hi], shift[lo:hi])
            if use_weight:
                dy_scale[i] = saturate(invstd[g] * np.float64(weight[c]), big)
            parameter_gradients(c, sum_dy[i], sum_dy_xmu[i], invstd[g], row_dweight, row_dbias)
            dweight[c] += row_dweight[c]
            dbias[c] += row_dbias[c]

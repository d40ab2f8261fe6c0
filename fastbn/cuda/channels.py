"""Per-channel kernels, one thread per channel: merges of two per-channel statistics,
their variance, and the coefficients of the elementwise passes, each thread calling
one function of :mod:`fastbn.algebra` (the formulas the CPU backend runs too).

They turn statistics into the vectors the elementwise kernels use on the device, so
nothing goes back to the host.  The algebra runs in float64 (values are read through
``np.float64``) and each store rounds once into its array's dtype (the policy's
statistics, parameter or compute dtype, :mod:`fastbn.dtypes`).
"""

import math

import numpy as np
from numba import cuda

from ..algebra import (backward_channel, chan_merge, forward_channel, parameter_gradients,
                       population_variance, running_update)


@cuda.jit
def forward_coefficients(count, mean, second, from_moments, weight, bias, use_weight, use_bias, eps, big,
                         momentum, running_mean, running_var, update_running,
                         save_mean, save_invstd, center, scale, shift):
    """Per channel: saved statistics, the running-statistics update and the apply coefficients.

    ``second`` is M2 when ``from_moments`` (batch statistics over ``count`` values,
    var = M2 / count), else the variance itself (running statistics; ``count`` unused).
    Absent optional vectors are passed as placeholders of the right dtype and read only
    under their flag (a kernel argument cannot be None in every Numba version).
    ``save_mean`` may be ``mean`` itself.  See :func:`fastbn.algebra.forward_channel`
    and :func:`fastbn.algebra.running_update`.
    """
    c = cuda.grid(1)
    if c >= mean.shape[0]:
        return
    if from_moments:
        n, mu, m2 = np.float64(count[c]), np.float64(mean[c]), np.float64(second[c])
        if update_running:
            running_update(c, n, mu, population_variance(n, m2), momentum, running_mean, running_var)
        forward_channel(c, mu, population_variance(n, m2), weight, bias, use_weight, use_bias, eps, big,
                        save_mean, save_invstd, center, scale, shift)
    else:
        forward_channel(c, np.float64(mean[c]), np.float64(second[c]), weight, bias, use_weight, use_bias, eps,
                        big, save_mean, save_invstd, center, scale, shift)


@cuda.jit
def backward_coefficients(count, sum_dy, sum_dy_xmu, mean, invstd, weight, use_weight, training, big,
                          center, dy_scale, x_scale, shift):
    """Per channel: the coefficients of the dx pass (:func:`fastbn.algebra.backward_channel`)."""
    c = cuda.grid(1)
    if c >= invstd.shape[0]:
        return
    backward_channel(c, np.float64(count[c]), np.float64(sum_dy[c]), np.float64(sum_dy_xmu[c]),
                     np.float64(mean[c]), np.float64(invstd[c]), weight, use_weight, training, big,
                     center, dy_scale, x_scale, shift)


@cuda.jit
def weight_bias_gradients(sum_dy, sum_dy_xmu, invstd, dweight, dbias):
    """Per channel: dweight and dbias (:func:`fastbn.algebra.parameter_gradients`)."""
    c = cuda.grid(1)
    if c >= invstd.shape[0]:
        return
    parameter_gradients(c, np.float64(sum_dy[c]), np.float64(sum_dy_xmu[c]), np.float64(invstd[c]),
                        dweight, dbias)


@cuda.jit
def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b, count, mean, m2):
    """(count, mean, M2) of the union of two per-channel moments; all (C,) float64."""
    c = cuda.grid(1)
    if c >= mean.shape[0]:
        return
    count[c], mean[c], m2[c] = chan_merge(count_a[c], mean_a[c], m2_a[c], count_b[c], mean_b[c], m2_b[c])


@cuda.jit
def merge_sums(count_a, sum_dy_a, sum_dy_xmu_a, count_b, sum_dy_b, sum_dy_xmu_b, count, sum_dy, sum_dy_xmu):
    """Per-channel backward sums of the union of two parts (added); all (C,) float64."""
    c = cuda.grid(1)
    if c >= count.shape[0]:
        return
    count[c] = count_a[c] + count_b[c]
    sum_dy[c] = sum_dy_a[c] + sum_dy_b[c]
    sum_dy_xmu[c] = sum_dy_xmu_a[c] + sum_dy_xmu_b[c]


@cuda.jit(device=True)
def _variance(count, m2, c):
    """Population variance ``M2 / count`` of channel ``c``, NaN where the count is 0."""
    n = np.float64(count[c])
    if n > 0:
        return np.float64(m2[c]) / n
    return math.nan


@cuda.jit
def mean_var(count, mean, m2, copy_mean, mean_out, var):
    """Per channel: the population variance into ``var`` and, when ``copy_mean``, the
    mean into ``mean_out`` (rounded to its dtype)."""
    c = cuda.grid(1)
    if c >= var.shape[0]:
        return
    if copy_mean:
        mean_out[c] = mean[c]
    var[c] = _variance(count, m2, c)


@cuda.jit
def inverse_std(count, m2, eps, invstd):
    """Per channel: ``1 / sqrt(M2 / count + eps)`` (float64)."""
    c = cuda.grid(1)
    if c >= invstd.shape[0]:
        return
    invstd[c] = 1.0 / math.sqrt(_variance(count, m2, c) + eps)


@cuda.jit(device=True)
def finish_moments(c, n, mean, m2, out_n, out_mean, out_m2, finalize, weight, bias, use_weight, use_bias, eps,
                   big, momentum, running_mean, running_var, update_running, save_mean, save_invstd,
                   center, scale, shift):
    """Store channel ``c``'s merged float64 moments and, when ``finalize``, what
    :func:`forward_coefficients` computes from them (the same algebra, in the thread that
    merged them: the reduction kernel's last block, so a training forward needs no
    separate coefficients launch).  Without ``finalize`` the other arguments are
    placeholders, never read."""
    out_n[c] = n
    out_mean[c] = mean
    out_m2[c] = m2
    if finalize:
        if update_running:
            running_update(c, n, mean, population_variance(n, m2), momentum, running_mean, running_var)
        forward_channel(c, mean, population_variance(n, m2), weight, bias, use_weight, use_bias, eps, big,
                        save_mean, save_invstd, center, scale, shift)


@cuda.jit(device=True)
def finish_sums(c, count, sum_dy, sum_dy_xmu, out_count, out_sum_dy, out_sum_dy_xmu, finalize, mean, invstd,
                weight, use_weight, training, big, dweight, dbias, center, dy_scale, x_scale, shift):
    """Store channel ``c``'s backward sums and, when ``finalize``, the parameter gradients
    and the dx coefficients (:func:`weight_bias_gradients`, :func:`backward_coefficients`)
    from them, in the reduction's last block.  Placeholders when not ``finalize``."""
    out_count[c] = count
    out_sum_dy[c] = sum_dy
    out_sum_dy_xmu[c] = sum_dy_xmu
    if finalize:
        s = np.float64(invstd[c])
        parameter_gradients(c, sum_dy, sum_dy_xmu, s, dweight, dbias)
        backward_channel(c, np.float64(count), sum_dy, sum_dy_xmu, np.float64(mean[c]), s, weight, use_weight,
                         training, big, center, dy_scale, x_scale, shift)

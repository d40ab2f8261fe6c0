"""Per-index kernels of group, instance and layer norm on the GPU: the twin of
:mod:`fastbn.cpu.groups`, one thread per vector entry, each calling the formulas of
:mod:`fastbn.algebra` (these kernels only route indices).

Index conventions as on the CPU: per-(n, c) vectors have N * C entries (``n * C + c``),
per-(n, g) ones N * G (``n * G + g``); with ``group_size = C // G`` the group of entry
``i`` is ``i // group_size``.  Every thread of a group Chan-merges or sums the group's
entries itself, in the same fixed order, so results are deterministic and no thread
waits on another (groups hold a handful of channels, O(C / G) work per thread).  Absent
optional vectors are placeholders of the right dtype, read only under their flag.
"""

import numpy as np
from numba import cuda

from ..algebra import (backward_channel, chan_merge, forward_channel, parameter_gradients, population_variance,
                       running_update, saturate)


@cuda.jit
def group_forward_coefficients(count, mean, m2, group_size, weight, bias, use_weight, use_bias, eps, big,
                               channel_mean, channel_invstd, save_mean, save_invstd, center, scale, shift):
    """Per (n, c): the coefficients of ``y = (x - center) * scale + shift`` from the
    Chan merge of its group's per-(n, c) moments.

    count, mean, m2: (N * C,) float64 per-(n, c) moments; weight, bias: (C,);
    channel_mean, channel_invstd: (N * C,) float64 scratch; save_mean, save_invstd:
    (N * G,) outputs in the statistics dtype; center, scale, shift: (N * C,) in the compute dtype (largest
    finite value ``big``).
    """
    i = cuda.grid(1)
    if i >= center.shape[0]:
        return
    num_channels = weight.shape[0]
    g = i // group_size
    n_a = 0.0
    m_a = 0.0
    s_a = 0.0
    for j in range(g * group_size, (g + 1) * group_size):
        n_a, m_a, s_a = chan_merge(n_a, m_a, s_a, count[j], mean[j], m2[j])
    lo = i - i % num_channels
    hi = lo + num_channels
    c = i - lo
    forward_channel(c, m_a, population_variance(n_a, s_a), weight, bias, use_weight, use_bias, eps, big,
                    channel_mean[lo:hi], channel_invstd[lo:hi], center[lo:hi], scale[lo:hi], shift[lo:hi])
    if i % group_size == 0:
        save_mean[g] = m_a
        save_invstd[g] = channel_invstd[i]


@cuda.jit
def instance_running_update(count, mean, m2, momentum, running_tile_mean, running_tile_var,
                            running_mean, running_var):
    """Per channel c: PyTorch's instance-norm running update, each sample's (n, c)
    statistics folded into a copy of the running ones (:func:`running_update`), the
    copies averaged over n.  count, mean, m2: (N * C,) float64; running_tile_*: (N * C,)
    float64 scratch; running_mean, running_var: (C,), updated in place."""
    c = cuda.grid(1)
    num_channels = running_mean.shape[0]
    if c >= num_channels:
        return
    num_samples = mean.shape[0] // num_channels
    total_mean = 0.0
    total_var = 0.0
    for n in range(num_samples):
        i = n * num_channels + c
        running_tile_mean[i] = np.float64(running_mean[c])
        running_tile_var[i] = np.float64(running_var[c])
        running_update(i, count[i], mean[i], population_variance(count[i], m2[i]), momentum, running_tile_mean, running_tile_var)
        total_mean += running_tile_mean[i]
        total_var += running_tile_var[i]
    running_mean[c] = total_mean / num_samples
    running_var[c] = total_var / num_samples


@cuda.jit
def expand_groups(group_values, group_size, values):
    """values[i] = group_values[i // group_size]: a per-(n, g) vector per (n, c)."""
    i = cuda.grid(1)
    if i < values.shape[0]:
        values[i] = group_values[i // group_size]


@cuda.jit
def group_backward_coefficients(count, sum_dy, sum_dy_xmu, mean, invstd, group_size, weight, use_weight, big,
                                center, dy_scale, x_scale, shift):
    """Per (n, c): the coefficients of ``dx = dy * dy_scale + (x - center) * x_scale + shift``.

    count: float64 values per group; sum_dy, sum_dy_xmu: (N * C,) float64 per-(n, c) sums
    of dy and dy * (x - mean); mean, invstd: (N * G,) float64 (the forward's).  As on the
    CPU (:func:`fastbn.cpu.groups.group_backward_coefficients`): the group's sums of
    g = weight * dy give :func:`backward_channel`'s coefficients, ``dy_scale`` gets the
    channel's weight.
    """
    i = cuda.grid(1)
    if i >= center.shape[0]:
        return
    num_channels = weight.shape[0]
    g = i // group_size
    group_dy = 0.0
    group_dy_xmu = 0.0
    for j in range(g * group_size, (g + 1) * group_size):
        w = 1.0
        if use_weight:
            w = np.float64(weight[j % num_channels])
        group_dy += w * sum_dy[j]
        group_dy_xmu += w * sum_dy_xmu[j]
    lo = i - i % num_channels
    hi = lo + num_channels
    c = i - lo
    r = np.float64(invstd[g])
    backward_channel(c, count, group_dy, group_dy_xmu, np.float64(mean[g]), r, weight, False, True, big,
                     center[lo:hi], dy_scale[lo:hi], x_scale[lo:hi], shift[lo:hi])
    if use_weight:
        dy_scale[i] = saturate(r * np.float64(weight[c]), big)


@cuda.jit
def group_parameter_gradients(sum_dy, sum_dy_xmu, invstd, group_size, scratch_dweight, scratch_dbias,
                              dweight, dbias):
    """Per channel c: dweight and dbias, the per-(n, c) :func:`parameter_gradients`
    summed over n.  sum_*: (N * C,) float64; invstd (N * G,) float64; scratch_*: (N * C,)
    float64; dweight, dbias: (C,) in the parameter dtype."""
    c = cuda.grid(1)
    num_channels = dweight.shape[0]
    if c >= num_channels:
        return
    total_dweight = 0.0
    total_dbias = 0.0
    for n in range(sum_dy.shape[0] // num_channels):
        i = n * num_channels + c
        parameter_gradients(i, sum_dy[i], sum_dy_xmu[i], np.float64(invstd[i // group_size]),
                            scratch_dweight, scratch_dbias)
        total_dweight += scratch_dweight[i]
        total_dbias += scratch_dbias[i]
    dweight[c] = total_dweight
    dbias[c] = total_dbias


# --------------------------------------------------------------------------- layer norm's vectors

@cuda.jit
def column_coefficients(weight, bias, use_weight, use_bias, center, scale, shift):
    """Per column k of layer norm's (M, K) view: the elementwise coefficients of its
    affine ``y = x * weight[k] + bias[k]`` (center 0; scale 1 and shift 0 when absent)."""
    k = cuda.grid(1)
    if k >= center.shape[0]:
        return
    center[k] = 0.0
    scale[k] = weight[k] if use_weight else 1.0
    shift[k] = bias[k] if use_bias else 0.0


@cuda.jit
def normalized_coefficients(mean, invstd, big, scratch_mean, scratch_invstd, center, scale, shift):
    """Per row m: the coefficients of ``x_hat = (x - mean[m]) * invstd[m]`` from the
    saved statistics (:func:`forward_channel` with var = invstd**-2 and eps 0, which
    gives back invstd to a float64 rounding).  mean, invstd: (M,) float64."""
    m = cuda.grid(1)
    if m >= center.shape[0]:
        return
    r = np.float64(invstd[m])
    forward_channel(m, np.float64(mean[m]), 1.0 / (r * r), scale, shift, False, False, 0.0, big,
                    scratch_mean, scratch_invstd, center, scale, shift)


@cuda.jit
def column_gradients(sum_dy, sum_dy_xhat, dweight, dbias):
    """Per column k: dweight = sum(dy * x_hat), dbias = sum(dy) (:func:`parameter_gradients`
    with the normalization already applied); (K,) float64 in, parameter dtype out."""
    k = cuda.grid(1)
    if k < dweight.shape[0]:
        parameter_gradients(k, sum_dy[k], sum_dy_xhat[k], 1.0, dweight, dbias)

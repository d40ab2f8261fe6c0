"""The per-channel algebra of normalization, written once for every backend.

Plain scalar Python functions registered with :func:`numba.extending.register_jitable`:
Numba compiles them into the CPU kernels (``numba.njit``) and into the CUDA kernels
(``numba.cuda.jit``) that call them, and they remain ordinary Python functions (which is
how Numba's CUDA simulator runs them).  Both backends therefore evaluate the same
formulas in the same order: the moments of shifted sums, Chan's merge, and the
coefficients of the elementwise passes.

Functions that fill per-channel outputs take the channel index ``c`` and the arrays, so
a CPU loop over channels and a CUDA thread per channel make the same call.  Stores into
an output array round to that array's dtype; that is how the centre split below gets
the mean rounded to the compute dtype without naming it.

Optional inputs (weight, bias) are always read, absent ones from placeholder vectors of
length C, and their flags choose between scalars: a branch around an array access kept
Numba from pruning the arrays' reference counting in CPU loops, ~10x slower.  For the
same reason the running-statistics update is a call of its own (:func:`running_update`)
that a kernel makes under its flag, outside its channel loop on the CPU.

Accuracy.  ``y = (x - mean) * scale + shift`` must not be evaluated as ``x * a + b``:
on offset data (x = 1e6 + 0.01 * randn, float32) ``b`` is ~1e8 and the rounding of the
product alone swamps ``y``.  The mean is split into ``center`` (the mean rounded to the
compute dtype) and the float64 remainder ``mean - center``; ``x - center`` is exact for
``x`` near the mean (Sterbenz) and the remainder is folded into the per-channel shift, so
an element costs one subtraction and one fused multiply-add.

Scalars come in as float64 and array elements are read through ``np.float64``, so the
arithmetic is float64 whatever the arrays' dtypes, compiled or not (uncompiled NumPy
would keep ``float32 * 1.0`` in float32).

Saturation.  Coefficients beyond the compute dtype's range are stored as its largest
finite value (``big``) instead of overflowing to Inf: with a tiny ``eps`` a constant
float32 channel has ``invstd`` ~1e150, and ``(x - center) * inf`` would be
``0 * inf = NaN`` where the exact result is ``bias``.  NaN and Inf from NaN/Inf data pass
through unchanged (every test is a comparison, false for NaN).
"""

import math

import numpy as np
from numba.extending import register_jitable


def algebra_function(fn):
    """How every function below is registered (one place to change it).

    Not inlined at the Numba IR level: in CUDA kernels that put the inlined branches
    out of SSA scope.  LLVM inlines these small functions on the CPU anyway, as long as
    a kernel calls them directly: a function calling another one with arrays was left
    a call, and its arrays' reference counting made a channel loop ~10x slower.  So the
    kernels call them flat (no function here calls one that takes arrays).
    """
    return register_jitable(fn)


@algebra_function
def shifted_moments(pivot, s1, s2, n):
    """(mean, M2) of ``n`` > 0 values from their sums shifted by ``pivot``.

    ``s1 = sum(x - pivot)`` and ``s2 = sum((x - pivot)**2)``; with ``pivot`` one of the
    values the terms are the size of the spread, not of the mean, so ``M2 = s2 - s1**2/n``
    does not cancel catastrophically (unlike ``E[x^2] - E[x]^2`` on raw values).
    """
    mean_shift = s1 / n
    m2 = s2 - s1 * mean_shift
    if m2 < 0:  # rounding only; a comparison, so a NaN stays NaN
        m2 = m2 * 0
    return pivot + mean_shift, m2


@algebra_function
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) partials into one.

    An empty partial (count 0) is neutral and the other is returned exactly.  The merge
    is a few float64 operations with non-negative terms in M2, so each one adds a
    relative error of a few units of float64 roundoff (see :mod:`fastbn.stats`).
    """
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    frac_b = n_b / n
    return n, mean_a + delta * frac_b, m2_a + m2_b + delta * delta * (n_a * frac_b)


@algebra_function
def saturate(v, big):
    """``v`` clipped to [-big, big]; NaN passes through."""
    if v > big:
        return big
    if v < -big:
        return -big
    return v


@algebra_function
def forward_channel(c, mean, var, weight, bias, use_weight, use_bias, eps, big,
                    save_mean, save_invstd, center, scale, shift):
    """Channel ``c``'s saved statistics and the coefficients of ``y = (x - center) * scale + shift``.

    mean, var: float64 scalars, the statistics to normalize with (batch or running; var
    biased).  weight, bias: (C,) arrays, used only when ``use_weight`` / ``use_bias`` (else
    scale 1, shift 0) but always read: absent ones are placeholders of length C.  save_mean, save_invstd: outputs, ``mean`` and
    ``1 / sqrt(var + eps)``.  center, scale, shift: outputs in the compute dtype, whose
    largest finite value is ``big``.
    """
    invstd = 1.0 / math.sqrt(var + eps)
    w = np.float64(weight[c])
    b = np.float64(bias[c])
    a = invstd
    t = 0.0
    if use_weight:
        a = invstd * w
    if use_bias:
        t = b
    save_mean[c] = mean
    save_invstd[c] = invstd
    center[c] = mean  # rounds to the compute dtype
    scale[c] = saturate(a, big)
    shift[c] = saturate(t - (mean - np.float64(center[c])) * a, big)


@algebra_function
def population_variance(count, m2):
    """Biased variance ``M2 / count`` of batch moments (float64 scalars)."""
    return m2 / count


@algebra_function
def running_update(c, count, mean, var, momentum, running_mean, running_var):
    """``r = (1 - momentum) * r + momentum * batch`` for channel ``c``, in place.

    count, mean, var: float64 scalars, the batch statistics (``var`` biased, from
    :func:`population_variance`; passed in, not computed here: a nested call kept this
    function from being inlined on the CPU, 10x slower).  The running variance gets the
    unbiased ``var * count / (count - 1)`` (as PyTorch); ``count`` is that of the merged
    statistics, so statistics merged from elsewhere unbias correctly.
    """
    keep = 1.0 - momentum
    running_mean[c] = keep * np.float64(running_mean[c]) + momentum * mean
    running_var[c] = keep * np.float64(running_var[c]) + momentum * (var * (count / (count - 1.0)))


@algebra_function
def backward_channel(c, count, sum_dy, sum_dy_xmu, mean, invstd, weight, use_weight, training, big,
                     center, dy_scale, x_scale, shift):
    """Channel ``c``'s coefficients of ``dx = dy * dy_scale + (x - center) * x_scale + shift``.

    count, sum_dy, sum_dy_xmu, mean, invstd: float64 scalars.  Training (gradient
    through the batch statistics over ``count`` values): ``dy_scale = w * invstd``,
    ``x_scale = -dy_scale * invstd**2 * sum_dy_xmu / count``,
    ``shift = -dy_scale * sum_dy / count`` plus the centre remainder.  Eval (statistics
    are constants): ``dx = dy * dy_scale``, the other coefficients 0.
    """
    w = np.float64(weight[c])
    ds = invstd
    if use_weight:
        ds = invstd * w
    dy_scale[c] = saturate(ds, big)
    rounded = 0.0
    if training:
        rounded = mean
    center[c] = rounded  # rounds to the compute dtype
    remainder = mean - np.float64(center[c])
    xs = 0.0
    sh = 0.0
    if training:
        # invstd * (invstd * mean(dy (x - mean))) first: 0 for a constant channel even
        # when invstd**2 overflows (tiny eps), where invstd * invstd * ... gave inf * 0 = NaN.
        xs = -ds * (invstd * (invstd * (sum_dy_xmu / count)))
        sh = saturate(-ds * (sum_dy / count) - remainder * xs, big)
    x_scale[c] = saturate(xs, big)
    shift[c] = sh


@algebra_function
def parameter_gradients(c, sum_dy, sum_dy_xmu, invstd, dweight, dbias):
    """Channel ``c``'s ``dweight = sum(dy * x_hat) = invstd * sum(dy * (x - mean))`` and
    ``dbias = sum(dy)``, from float64 scalars."""
    dweight[c] = sum_dy_xmu * invstd
    dbias[c] = sum_dy

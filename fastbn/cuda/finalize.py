"""Per-channel algebra of the forward and backward passes, one thread per channel.

These small kernels turn the per-channel statistics or sums into the vectors the
elementwise kernels use, on the device, so nothing goes back to the host.  They do the
math of :mod:`fastbn.cpu.driver` in the accumulator dtype (float64, or float32 for
float16 inputs) and round once, into the compute dtype, at the end.

Accuracy.  ``y = (x - mean) * scale + shift`` is evaluated with ``center`` (the mean
rounded to the compute dtype) in place of the mean: ``x - center`` is exact for x near
the mean (Sterbenz), and the remainder ``mean - center`` is folded into the shift;
evaluating ``x * a + b`` instead would lose y to rounding on offset data.
"""

import functools
import math

from numba import cuda

from .dtypes import accumulator_dtype, compute_dtype


@functools.cache
def finalize_kernels(dtype):
    """(forward_finalize, backward_finalize) for inputs of ``dtype``."""
    acc = accumulator_dtype(dtype).type
    comp = compute_dtype(dtype).type

    @cuda.jit
    def forward_finalize(mean, var, weight, bias, use_weight, use_bias, eps, training,
                         update_running, momentum, count, running_mean, running_var,
                         save_mean, save_invstd, center, scale, shift):
        """Per channel: invstd, the elementwise vectors and the running-statistics update.

        mean, var: (C,) the batch statistics (training) or the running ones (eval).
        weight, bias: (C,), read only when ``use_weight`` / ``use_bias``.
        running_mean, running_var: (C,), updated in place when ``update_running``:
        ``r = (1 - momentum) * r + momentum * batch``, var unbiased by count / (count - 1).
        save_mean, save_invstd: (C,) outputs (may alias mean).
        center, scale, shift: (C,) outputs in the compute dtype.
        """
        c = cuda.grid(1)
        if c >= mean.shape[0]:
            return
        m = acc(mean[c])
        v = acc(var[c])
        if training and update_running:
            keep = acc(1.0 - momentum)
            running_mean[c] = keep * acc(running_mean[c]) + acc(momentum) * m
            running_var[c] = keep * acc(running_var[c]) + acc(momentum) * (v * acc(count / (count - 1.0)))
        invstd = acc(1.0) / math.sqrt(v + acc(eps))
        a = invstd
        if use_weight:
            a = invstd * acc(weight[c])
        t = acc(0)
        if use_bias:
            t = acc(bias[c])
        cen = comp(m)
        save_mean[c] = m
        save_invstd[c] = invstd
        center[c] = cen
        scale[c] = comp(a)
        shift[c] = comp(t - (m - acc(cen)) * a)

    @cuda.jit
    def backward_finalize(sum_dy, sum_dy_xmu, save_mean, save_invstd, weight, use_weight, training,
                          count, dweight, dbias, center, dy_scale, x_scale, shift):
        """Per channel: dweight, dbias and the vectors of the dx kernel.

        sum_dy, sum_dy_xmu: (C,) accumulator dtype; dweight, dbias: (C,) outputs;
        training: ``dx = dy * dy_scale + (x - center) * x_scale + shift`` with
        ``dy_scale = w * invstd``, ``x_scale = -dy_scale * invstd**2 * sum_dy_xmu / count``,
        ``shift = -dy_scale * sum_dy / count`` (plus the centering remainder); eval:
        ``dx = dy * dy_scale`` (center, x_scale, shift zero).
        """
        c = cuda.grid(1)
        if c >= sum_dy.shape[0]:
            return
        invstd = acc(save_invstd[c])
        sdy = acc(sum_dy[c])
        sdx = acc(sum_dy_xmu[c])
        ds = invstd
        if use_weight:
            ds = invstd * acc(weight[c])
        dweight[c] = sdx * invstd
        dbias[c] = sdy
        dy_scale[c] = comp(ds)
        if training:
            m = acc(save_mean[c])
            xs = -ds * invstd * invstd * (sdx / acc(count))
            cen = comp(m)
            center[c] = cen
            x_scale[c] = comp(xs)
            shift[c] = comp(-ds * (sdy / acc(count)) - (m - acc(cen)) * xs)
        else:
            center[c] = 0
            x_scale[c] = 0
            shift[c] = 0

    return forward_finalize, backward_finalize

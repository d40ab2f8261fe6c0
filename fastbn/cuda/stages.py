"""The pipeline's stages on the GPU: moments -> merge -> coefficients -> apply, and for
backward sums -> coefficients -> apply; the twin of :mod:`fastbn.cpu.stages`, with the
same functions, arguments and results.

Arguments arrive validated (by :mod:`fastbn._api` or :mod:`fastbn.stages`).  They are
device arrays (numba, or anything with ``__cuda_array_interface__``), viewed zero-copy
as numba arrays at the top of every stage; every result goes back as the kind of array
the stage's data came as (:func:`~fastbn.cuda.arrays.like_caller`), so values handed
from stage to stage, and those the public functions return, are the caller's kind.

The host only plans launches: every value-dependent step (reductions, merges, the
per-channel algebra of :mod:`fastbn.algebra`, the running-statistics update) runs in
device kernels, and nothing is copied back to the host.  Launches are asynchronous on
the default stream; results are ready for anything queued after them there.  Each
stage launches the kernel of the family the :class:`~fastbn.geometry.Geometry` names
(planes or rows) on the flat buffer of its input, copied once into the kernels' order
when its bytes are in neither.
"""

import numpy as np
from numba import cuda

from .. import dtypes
from ..coefficients import BackwardCoefficients, ForwardCoefficients
from ..geometry import PLANES, batch_norm_geometry
from ..stats import BackwardSums, Moments
from . import channels, merge, views
from .arrays import as_numba, like_caller
from .planes import planes_kernels
from .plans import ReductionPlan, channel_grid, elementwise_grid, merge_grid
from .rows import rows_kernels

FLOAT64 = np.dtype(np.float64)

as_dense = views.as_dense


def geometry(x, layout):
    """The batch-norm :class:`~fastbn.geometry.Geometry` of device array ``x``."""
    a = as_numba(x)
    return batch_norm_geometry(a.shape, a.strides, a.dtype.itemsize, layout)


def _kernels(geom, dtype):
    return (planes_kernels if geom.family == PLANES else rows_kernels)(np.dtype(dtype))


def _new(number, shape, dtype):
    """``number`` fresh device arrays of ``shape`` and ``dtype``, parts of one allocation."""
    block = cuda.device_array((number, *(shape if isinstance(shape, tuple) else (shape,))), dtype=dtype)
    return tuple(block[i] for i in range(number))


def _like(caller, *arrays):
    return tuple(like_caller(a, caller) for a in arrays)


def _numba(*arrays):
    return tuple(as_numba(a) for a in arrays)


# --------------------------------------------------------------------------- statistics

def moments(x, geom):
    """Per-channel :class:`Moments` of ``x`` (float64 (C,)), one pass and one merge."""
    caller, x = x, as_numba(x)
    xf = views.kernel_input(x, geom)
    plan = ReductionPlan(geom)
    num_channels = geom.kept
    partials = _new(3, (num_channels, plan.num_partials), FLOAT64)
    launch = _kernels(geom, x.dtype).moments[plan.grid, plan.block]
    if geom.family == PLANES:
        launch(xf, num_channels, geom.inner, plan.share, *partials)
    else:
        launch(xf, num_channels, plan.share, *partials)
    result = _new(3, num_channels, FLOAT64)
    merge.merge_partials[merge_grid(num_channels, plan.num_partials)](*partials, *result)
    return Moments(*_like(caller, *result))


def merge_moments(a, b):
    """The :class:`Moments` of the union of ``a``'s and ``b``'s data."""
    caller = a.mean
    result = _new(3, a.mean.shape[0], FLOAT64)
    channels.merge_moments[channel_grid(a.mean.shape[0])](*_numba(*a), *_numba(*b), *result)
    return Moments(*_like(caller, *result))


def moments_var(m):
    """Population variance ``M2 / count``, float64 (NaN where count is 0)."""
    count, mean, m2 = _numba(*m)
    (var,) = _new(1, m2.shape[0], FLOAT64)
    channels.mean_var[channel_grid(m2.shape[0])](count, mean, m2, False, var, var)
    return like_caller(var, m.m2)


def mean_var(m, dtype):
    """``(mean, population var)`` of :class:`Moments` ``m`` in the statistics dtype of
    inputs of ``dtype`` (float32 for float16, else float64)."""
    statistics = dtypes.policy(dtype).statistics
    if statistics == FLOAT64:
        return m.mean, moments_var(m)
    count, mean, m2 = _numba(*m)
    out_mean, out_var = _new(2, m2.shape[0], statistics)
    channels.mean_var[channel_grid(m2.shape[0])](count, mean, m2, True, out_mean, out_var)
    return _like(m.mean, out_mean, out_var)


def moments_invstd(m, eps):
    """``1 / sqrt(var + eps)`` of :class:`Moments` ``m``, float64."""
    count, _, m2 = _numba(*m)
    (invstd,) = _new(1, m2.shape[0], FLOAT64)
    channels.inverse_std[channel_grid(m2.shape[0])](count, m2, float(eps), invstd)
    return like_caller(invstd, m.m2)


def merge_sums(a, b):
    """The :class:`BackwardSums` of the union of ``a``'s and ``b``'s data."""
    result = _new(3, a.count.shape[0], FLOAT64)
    channels.merge_sums[channel_grid(a.count.shape[0])](*_numba(*a), *_numba(*b), *result)
    return BackwardSums(*_like(a.sum_dy, *result))


# --------------------------------------------------------------------------- forward

def forward_coefficients(count, mean, second, from_moments, weight, bias, eps,
                         running_mean, running_var, momentum, update_running, dtype):
    """Per-channel :class:`ForwardCoefficients` for inputs of ``dtype``, and the
    running-statistics update (in place, when ``update_running``).

    ``second`` is M2 when ``from_moments`` (with ``count``), else the variance.  The
    saved mean is ``mean`` itself when that is a batch mean already in the statistics
    dtype; running statistics are only read in eval (never written, not even as the
    saved mean).
    """
    policy = dtypes.policy(dtype)
    caller = mean
    count, mean, second, weight, bias, running_mean, running_var = _numba(
        count, mean, second, weight, bias, running_mean, running_var)
    num_channels = mean.shape[0]
    center, scale, shift = _new(3, num_channels, policy.compute)
    new_mean, save_invstd = _new(2, num_channels, policy.statistics)
    reuse_mean = from_moments and mean.dtype == policy.statistics
    save_mean = mean if reuse_mean else new_mean
    # Absent optional vectors are placeholders of their dtype, read only under their flag.
    channels.forward_coefficients[channel_grid(num_channels)](
        mean if count is None else count, mean, second, from_moments,
        scale if weight is None else weight, shift if bias is None else bias,
        weight is not None, bias is not None, eps, dtypes.largest(policy.compute), momentum,
        center if running_mean is None else running_mean, center if running_var is None else running_var,
        update_running, save_mean, save_invstd, center, scale, shift)
    returned_mean = caller if reuse_mean else like_caller(save_mean, caller)
    return ForwardCoefficients(*_like(caller, center, scale, shift), returned_mean,
                               like_caller(save_invstd, caller))


def _apply_kernel(xf, yf, geom, dtype, center, scale, shift):
    """yf = (xf - center[c]) * scale[c] + shift[c] over flat buffers."""
    launch = _kernels(geom, dtype).apply[elementwise_grid(xf.size)]
    if geom.family == PLANES:
        launch(xf, geom.kept, geom.inner, center, scale, shift, yf)
    else:
        launch(xf, geom.kept, center, scale, shift, yf)


def apply(x, coefficients, geom, out):
    """``y = (x - center) * scale + shift`` per channel; ``out`` when given."""
    caller, x = x, as_numba(x)
    xf = views.kernel_input(x, geom)
    target = views.output_target(as_numba(out), (xf,), geom, x.dtype)
    c = coefficients
    _apply_kernel(xf, target, geom, x.dtype, *_numba(c.center, c.scale, c.shift))
    return views.finish_output(target, out, geom, caller)


# --------------------------------------------------------------------------- backward

def backward_sums(dy, x, mean, geom):
    """Per-channel :class:`BackwardSums`: count, sum(dy) and sum(dy * (x - mean)), float64."""
    caller = x
    dy, x, mean = _numba(dy, x, mean)
    dyf, xf = views.kernel_input(dy, geom), views.kernel_input(x, geom)
    plan = ReductionPlan(geom)
    num_channels = geom.kept
    partials = _new(2, (num_channels, plan.num_partials), FLOAT64)
    launch = _kernels(geom, x.dtype).backward_sums[plan.grid, plan.block]
    if geom.family == PLANES:
        launch(dyf, xf, mean, num_channels, geom.inner, plan.share, *partials)
    else:
        launch(dyf, xf, mean, num_channels, plan.share, *partials)
    result = _new(3, num_channels, FLOAT64)
    merge.sum_partials[merge_grid(num_channels, plan.num_partials)](*partials, float(geom.count), *result)
    return BackwardSums(*_like(caller, *result))


def backward_coefficients(sums, mean, invstd, weight, training, dtype):
    """Per-channel :class:`BackwardCoefficients` of the dx pass for inputs of ``dtype``."""
    policy = dtypes.policy(dtype)
    caller = invstd
    count, sum_dy, sum_dy_xmu = _numba(*sums)
    mean, invstd, weight = _numba(mean, invstd, weight)
    num_channels = invstd.shape[0]
    center, dy_scale, x_scale, shift = _new(4, num_channels, policy.compute)
    channels.backward_coefficients[channel_grid(num_channels)](
        count, sum_dy, sum_dy_xmu, mean, invstd, dy_scale if weight is None else weight, weight is not None,
        training, dtypes.largest(policy.compute), center, dy_scale, x_scale, shift)
    return BackwardCoefficients(*_like(caller, center, dy_scale, x_scale, shift))


def parameter_gradients(sums, invstd, dtype):
    """``(dweight, dbias)`` of this data's sums, (C,) in the parameter dtype of ``dtype``."""
    caller = invstd
    _, sum_dy, sum_dy_xmu = _numba(*sums)
    invstd = as_numba(invstd)
    dweight, dbias = _new(2, invstd.shape[0], dtypes.policy(dtype).parameters)
    channels.weight_bias_gradients[channel_grid(invstd.shape[0])](sum_dy, sum_dy_xmu, invstd, dweight, dbias)
    return _like(caller, dweight, dbias)


def backward_apply(dy, x, coefficients, geom, out):
    """``dx = dy * dy_scale + (x - center) * x_scale + shift`` per channel; ``out`` when given."""
    caller = x
    dy, x = _numba(dy, x)
    dyf, xf = views.kernel_input(dy, geom), views.kernel_input(x, geom)
    target = views.output_target(as_numba(out), (dyf, xf), geom, x.dtype)
    c = _numba(*coefficients)
    launch = _kernels(geom, x.dtype).backward_apply[elementwise_grid(xf.size)]
    if geom.family == PLANES:
        launch(dyf, xf, geom.kept, geom.inner, *c, target)
    else:
        launch(dyf, xf, geom.kept, *c, target)
    return views.finish_output(target, out, geom, caller)


def backward_scale(dy, coefficients, geom, out):
    """``dx = dy * dy_scale`` (eval mode, where the other coefficients are 0): the apply
    kernel with zero center and shift, one read pass fewer than :func:`backward_apply`."""
    caller, dy = dy, as_numba(dy)
    dyf = views.kernel_input(dy, geom)
    target = views.output_target(as_numba(out), (dyf,), geom, dy.dtype)
    c = coefficients
    _apply_kernel(dyf, target, geom, dy.dtype, *_numba(c.center, c.dy_scale, c.shift))
    return views.finish_output(target, out, geom, caller)

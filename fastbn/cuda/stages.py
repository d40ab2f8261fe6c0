"""The pipeline's stages on the GPU: moments -> merge -> coefficients -> apply, and for
backward sums -> coefficients -> apply; the twin of :mod:`fastbn.cpu.stages`, with the
same functions, arguments and results.

Arguments arrive validated (by :mod:`fastbn._api` or :mod:`fastbn.stages`).  They are
device arrays (numba, or anything with ``__cuda_array_interface__``), viewed zero-copy
as numba arrays at the top of every stage; every result is allocated as the kind of
array the stage's data came as (:func:`~fastbn.cuda.arrays.empty`), so values handed
from stage to stage, and those the public functions return, are the caller's kind.

The host only plans launches: every value-dependent step (reductions, merges, the
per-channel algebra of :mod:`fastbn.algebra`, the running-statistics update) runs in
device kernels, and nothing is copied back to the host.  Every launch goes to the
caller's stream (:mod:`fastbn.cuda.streams`) on the caller's device, and nothing waits
on the host: results are ready for anything queued after them there.  Results come
from the caller's library's allocator; scratch (partials, counters) from the cached
:mod:`fastbn.cuda.workspace`.  A reduction is one launch: the last block of a channel
to finish merges its partials (:func:`fastbn.cuda.merge.finished_last`).  Each
stage launches the kernel of the family the :class:`~fastbn.geometry.Geometry` names
(planes or rows) on the flat buffer of its input, copied once into the kernels' order
when its bytes are in neither.
"""

import collections
import functools

import numpy as np

from .. import dtypes
from ..coefficients import BackwardCoefficients, ForwardCoefficients
from ..geometry import PLANES, batch_norm_geometry
from ..stats import BackwardSums, Moments
from . import channels, elementwise, launching, streams, views, workspace
from .arrays import as_numba, data_pointer, empty, policy_of, strided_view, word_view
from .loadstore import needs_wide_index
from .planes import planes_kernels
from .plans import ReductionPlan, channel_grid
from .rows import rows_kernels

FLOAT64 = np.dtype(np.float64)


def _on_device_of(pick):
    """Decorator: run the stage on the device of the array ``pick(*args)`` returns."""
    def decorate(stage):
        @functools.wraps(stage)
        def run(*args, **options):
            with streams.on_device_of(pick(*args)):
                return stage(*args, **options)
        return run
    return decorate


def geometry(x, layout):
    """The batch-norm :class:`~fastbn.geometry.Geometry` of device array ``x``."""
    a = as_numba(x)
    return batch_norm_geometry(tuple(a.shape), tuple(a.strides), a.dtype.itemsize, layout)


@_on_device_of(lambda x, geom: x)
def as_dense(x, geom):
    """``x`` itself when dense in the kernels' order, else such a copy (caller's kind)."""
    return views.as_dense(x, geom, streams.for_array(x))


#: How a reduction runs: its :class:`~fastbn.cuda.plans.ReductionPlan`, the geometry of
#: its units, its arrays as units, and the kernels (:func:`reduction`).
Reduction = collections.namedtuple("Reduction", ["plan", "geometry", "units", "kernels"])


def reduction(geom, *arrays):
    """The :class:`Reduction` over flat kernel-order ``arrays`` (x, or dy and x): the
    family's kernels, in 32-bit indices below 2**31 elements; 16-bit buffers starting
    4-byte aligned reduce ``uint32`` words, two values per load, when no word straddles
    two planes (planes of even size) or two rows (an even number of channels)."""
    dtype = arrays[-1].dtype
    wide = needs_wide_index(arrays[-1].size)
    planes = geom.family == PLANES
    if (dtype.itemsize == 2 and (geom.inner if planes else geom.kept) % 2 == 0
            and all(data_pointer(a) % 4 == 0 for a in arrays)):
        geom = geom._replace(inner=geom.inner // 2) if planes else geom._replace(kept=geom.kept // 2)
        return Reduction(ReductionPlan(geom), geom, tuple(word_view(a, 0) for a in arrays),
                         (planes_kernels if planes else rows_kernels)(dtype, wide, True))
    return Reduction(ReductionPlan(geom), geom, arrays, (planes_kernels if planes else rows_kernels)(dtype, wide))


def _shape_args(red):
    g = red.geometry
    return (g.kept, g.inner, red.plan.share) if g.family == PLANES else (g.kept, red.plan.share)


def _new(caller, stream, number, shape, dtype):
    """``number`` fresh arrays of ``caller``'s kind, ``shape`` and ``dtype``, parts of one allocation."""
    block = empty(caller, (number, *(shape if isinstance(shape, tuple) else (shape,))), dtype, stream=stream)
    return tuple(block[i] for i in range(number))


def _numba(*arrays):
    return tuple(as_numba(a) for a in arrays)


def _partials(caller, stream, name, number, num_channels, num_partials):
    """``number`` (C, P) float64 scratch arrays, and the (zeroed) completion counters."""
    device = streams.device_of(caller)
    per = num_channels * num_partials
    buffer = workspace.scratch(device, stream, name, number * per, FLOAT64)
    parts = tuple(strided_view(buffer[i * per:(i + 1) * per], (num_channels, num_partials),
                               (num_partials * 8, 8)) for i in range(number))
    counters = workspace.scratch(device, stream, name + ".counters", num_channels, np.int32, zeroed=True)
    return parts, counters


def _launch(kernel, config, stream, *args, shared_bytes=0):
    grid, block = config
    launching.launch(kernel, grid, block, stream, *args, shared_bytes=shared_bytes)


# --------------------------------------------------------------------------- statistics

@_on_device_of(lambda x, geom: x)
def moments(x, geom):
    """Per-channel :class:`Moments` of ``x`` (float64 (C,)): one launch, one pass."""
    caller, stream, x = x, streams.for_array(x), as_numba(x)
    red = reduction(geom, views.kernel_input(x, geom, stream, caller))
    num_channels = geom.kept
    partials, counters = _partials(caller, stream, "moments", 3, num_channels, red.plan.num_partials)
    result = _new(caller, stream, 3, num_channels, FLOAT64)
    out = _numba(*result)
    launch_moments(red, stream, partials, counters, out, no_forward_finish(out[1]))
    return Moments(*result)


def no_forward_finish(placeholder):
    """The reduction's finishing arguments when it only stores the moments
    (:func:`fastbn.cuda.channels.finish_moments`; ``placeholder``: any float64 vector)."""
    p = placeholder
    return (False, p, p, False, False, 1.0, 1.0, 0.0, p, p, False, p, p, p, p, p)


def launch_moments(red, stream, partials, counters, out, finish):
    """Launch the moments :class:`Reduction` ``red`` (one launch, see the kernels)."""
    launching.launch(red.kernels.moments, red.plan.grid, red.plan.block, stream, *red.units, *_shape_args(red),
                     *partials, counters, *out, *finish)


@_on_device_of(lambda a, b: a.mean)
def merge_moments(a, b):
    """The :class:`Moments` of the union of ``a``'s and ``b``'s data."""
    caller = a.mean
    stream = streams.for_array(caller)
    result = _new(caller, stream, 3, a.mean.shape[0], FLOAT64)
    _launch(channels.merge_moments, channel_grid(a.mean.shape[0]), stream, *_numba(*a), *_numba(*b),
            *_numba(*result))
    return Moments(*result)


@_on_device_of(lambda m: m.m2)
def moments_var(m):
    """Population variance ``M2 / count``, float64 (NaN where count is 0)."""
    stream = streams.for_array(m.m2)
    count, mean, m2 = _numba(*m)
    (var,) = _new(m.m2, stream, 1, m2.shape[0], FLOAT64)
    var_numba = as_numba(var)
    _launch(channels.mean_var, channel_grid(m2.shape[0]), stream, count, mean, m2, False, var_numba, var_numba)
    return var


@_on_device_of(lambda m, dtype: m.m2)
def mean_var(m, dtype):
    """``(mean, population var)`` of :class:`Moments` ``m`` in the statistics dtype of
    inputs of ``dtype`` (float32 for float16, else float64)."""
    statistics = dtypes.policy(dtype).statistics
    if statistics == FLOAT64:
        return m.mean, moments_var(m)
    stream = streams.for_array(m.m2)
    count, mean, m2 = _numba(*m)
    out_mean, out_var = _new(m.mean, stream, 2, m2.shape[0], statistics)
    _launch(channels.mean_var, channel_grid(m2.shape[0]), stream, count, mean, m2, True,
            *_numba(out_mean, out_var))
    return out_mean, out_var


@_on_device_of(lambda m, eps: m.m2)
def moments_invstd(m, eps):
    """``1 / sqrt(var + eps)`` of :class:`Moments` ``m``, float64."""
    stream = streams.for_array(m.m2)
    count, _, m2 = _numba(*m)
    (invstd,) = _new(m.m2, stream, 1, m2.shape[0], FLOAT64)
    _launch(channels.inverse_std, channel_grid(m2.shape[0]), stream, count, m2, float(eps), as_numba(invstd))
    return invstd


@_on_device_of(lambda a, b: a.sum_dy)
def merge_sums(a, b):
    """The :class:`BackwardSums` of the union of ``a``'s and ``b``'s data."""
    stream = streams.for_array(a.sum_dy)
    result = _new(a.sum_dy, stream, 3, a.count.shape[0], FLOAT64)
    _launch(channels.merge_sums, channel_grid(a.count.shape[0]), stream, *_numba(*a), *_numba(*b),
            *_numba(*result))
    return BackwardSums(*result)


# --------------------------------------------------------------------------- forward

@_on_device_of(lambda count, mean, *rest: mean)
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
    stream = streams.for_array(caller)
    count, mean, second, weight, bias, running_mean, running_var = _numba(
        count, mean, second, weight, bias, running_mean, running_var)
    num_channels = mean.shape[0]
    coefficients = _new(caller, stream, 3, num_channels, policy.compute)
    new_mean, save_invstd = _new(caller, stream, 2, num_channels, policy.statistics)
    center, scale, shift = _numba(*coefficients)
    reuse_mean = from_moments and mean.dtype == policy.statistics
    save_mean = mean if reuse_mean else as_numba(new_mean)
    # Absent optional vectors are placeholders of their dtype, read only under their flag.
    _launch(channels.forward_coefficients, channel_grid(num_channels), stream,
            mean if count is None else count, mean, second, from_moments,
            scale if weight is None else weight, shift if bias is None else bias,
            weight is not None, bias is not None, eps, dtypes.largest(policy.compute), momentum,
            center if running_mean is None else running_mean, center if running_var is None else running_var,
            update_running, save_mean, as_numba(save_invstd), center, scale, shift)
    return ForwardCoefficients(*coefficients, caller if reuse_mean else new_mean, save_invstd)


def plane_size(geom):
    """``S`` of the elementwise kernels' index space: the plane size, 1 for rows."""
    return geom.inner if geom.family == PLANES else 1


def epilogue_floor(activation, dtype):
    """The apply kernel's lower bound in the compute dtype of storage ``dtype``: 0 for
    ``"relu"``, -inf for none (as :func:`fastbn.cpu.stages.epilogue_floor`)."""
    return policy_of(dtype).compute.type(0.0 if activation == "relu" else -np.inf)


def _apply_kernel(xf, yf, geom, dtype, stream, center, scale, shift, residual=None, activation=None):
    """yf = activation((xf - center[c]) * scale[c] + shift[c] + residual) over flat buffers
    (``residual`` a flat buffer like xf, or None)."""
    elementwise.launch_apply(xf, residual, yf, epilogue_floor(activation, dtype), plane_size(geom), geom.kept,
                             center, scale, shift, stream)


def _backward_apply_kernel(dyf, xf, dxf, geom, dtype, stream, center, dy_scale, x_scale, shift):
    """dxf = dyf * dy_scale[c] + (xf - center[c]) * x_scale[c] + shift[c] over flat buffers."""
    elementwise.launch_backward_apply(dyf, xf, dxf, plane_size(geom), geom.kept, center, dy_scale, x_scale, shift,
                                      stream)


@_on_device_of(lambda x, *rest: x)
def apply(x, coefficients, geom, out, residual=None, activation=None):
    """``y = activation((x - center) * scale + shift + residual)`` per channel; ``out``
    when given (``residual`` and ``activation``, None or "relu", optional)."""
    caller, stream, x = x, streams.for_array(x), as_numba(x)
    xf = views.kernel_input(x, geom, stream, caller)
    rf = None if residual is None else views.kernel_input(as_numba(residual), geom, stream, caller)
    inputs = (xf,) if rf is None else (xf, rf)
    native, target = views.output_target(as_numba(out), inputs, geom, x.dtype, caller, stream)
    c = coefficients
    _apply_kernel(xf, target, geom, x.dtype, stream, *_numba(c.center, c.scale, c.shift), residual=rf,
                  activation=activation)
    return views.finish_output(native, target, out, geom, stream)


@_on_device_of(lambda dy, *rest: dy)
def relu_mask(dy, y, geom):
    """``g = 0 where y <= 0 else dy`` (the ReLU's backward), a new array like ``dy`` in
    the kernels' order: one elementwise pass, after which the batch-norm backward runs on ``g``."""
    caller, stream = dy, streams.for_array(dy)
    dy, y = _numba(dy, y)
    dyf, yf = views.kernel_input(dy, geom, stream, caller), views.kernel_input(y, geom, stream, caller)
    native, target = views.new_output(caller, geom, dy.dtype, stream)
    elementwise.launch_relu_mask(dyf, yf, target, stream)
    return native


# --------------------------------------------------------------------------- backward

@_on_device_of(lambda dy, x, mean, geom: x)
def backward_sums(dy, x, mean, geom):
    """Per-channel :class:`BackwardSums`: count, sum(dy) and sum(dy * (x - mean)), float64."""
    caller, stream = x, streams.for_array(x)
    dy, x, mean = _numba(dy, x, mean)
    red = reduction(geom, views.kernel_input(dy, geom, stream, caller), views.kernel_input(x, geom, stream, caller))
    num_channels = geom.kept
    partials, counters = _partials(caller, stream, "sums", 2, num_channels, red.plan.num_partials)
    result = _new(caller, stream, 3, num_channels, FLOAT64)
    out = _numba(*result)
    launch_sums(red, mean, stream, partials, counters, out, no_backward_finish(out[1]))
    return BackwardSums(*result)


def no_backward_finish(placeholder):
    """The reduction's finishing arguments when it only stores the sums
    (:func:`fastbn.cuda.channels.finish_sums`; ``placeholder``: any float64 vector)."""
    p = placeholder
    return (False, p, p, False, False, 1.0, p, p, p, p, p, p)


def launch_sums(red, mean, stream, partials, counters, out, finish):
    """Launch the backward-sums :class:`Reduction` ``red`` over (dy, x) (one launch)."""
    launching.launch(red.kernels.backward_sums, red.plan.grid, red.plan.block, stream, *red.units, mean,
                     *_shape_args(red), *partials, counters, *out, *finish)


@_on_device_of(lambda sums, mean, invstd, *rest: invstd)
def backward_coefficients(sums, mean, invstd, weight, training, dtype):
    """Per-channel :class:`BackwardCoefficients` of the dx pass for inputs of ``dtype``."""
    policy = dtypes.policy(dtype)
    caller = invstd
    stream = streams.for_array(caller)
    count, sum_dy, sum_dy_xmu = _numba(*sums)
    mean, invstd, weight = _numba(mean, invstd, weight)
    num_channels = invstd.shape[0]
    coefficients = _new(caller, stream, 4, num_channels, policy.compute)
    center, dy_scale, x_scale, shift = _numba(*coefficients)
    _launch(channels.backward_coefficients, channel_grid(num_channels), stream,
            count, sum_dy, sum_dy_xmu, mean, invstd, dy_scale if weight is None else weight, weight is not None,
            training, dtypes.largest(policy.compute), center, dy_scale, x_scale, shift)
    return BackwardCoefficients(*coefficients)


@_on_device_of(lambda sums, invstd, dtype: invstd)
def parameter_gradients(sums, invstd, dtype):
    """``(dweight, dbias)`` of this data's sums, (C,) in the parameter dtype of ``dtype``."""
    caller = invstd
    stream = streams.for_array(caller)
    _, sum_dy, sum_dy_xmu = _numba(*sums)
    invstd = as_numba(invstd)
    dweight, dbias = _new(caller, stream, 2, invstd.shape[0], dtypes.policy(dtype).parameters)
    _launch(channels.weight_bias_gradients, channel_grid(invstd.shape[0]), stream, sum_dy, sum_dy_xmu, invstd,
            *_numba(dweight, dbias))
    return dweight, dbias


@_on_device_of(lambda dy, x, *rest: x)
def backward_apply(dy, x, coefficients, geom, out):
    """``dx = dy * dy_scale + (x - center) * x_scale + shift`` per channel; ``out`` when given."""
    caller, stream = x, streams.for_array(x)
    dy, x = _numba(dy, x)
    dyf, xf = views.kernel_input(dy, geom, stream, caller), views.kernel_input(x, geom, stream, caller)
    native, target = views.output_target(as_numba(out), (dyf, xf), geom, x.dtype, caller, stream)
    _backward_apply_kernel(dyf, xf, target, geom, x.dtype, stream, *_numba(*coefficients))
    return views.finish_output(native, target, out, geom, stream)


@_on_device_of(lambda dy, *rest: dy)
def backward_scale(dy, coefficients, geom, out):
    """``dx = dy * dy_scale`` (eval mode, where the other coefficients are 0): the apply
    kernel with zero center and shift, one read pass fewer than :func:`backward_apply`."""
    caller, stream, dy = dy, streams.for_array(dy), as_numba(dy)
    dyf = views.kernel_input(dy, geom, stream, caller)
    native, target = views.output_target(as_numba(out), (dyf,), geom, dy.dtype, caller, stream)
    c = coefficients
    _apply_kernel(dyf, target, geom, dy.dtype, stream, *_numba(c.center, c.dy_scale, c.shift))
    return views.finish_output(native, target, out, geom, stream)

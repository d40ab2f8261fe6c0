"""Layer, group and instance norm on the GPU: the batch-norm stages of
:mod:`fastbn.cuda.stages` driven by other geometries, plus the per-index kernels of
:mod:`fastbn.cuda.groups`; the twin of :mod:`fastbn.cpu.norms` (same functions and
arguments, validated by :mod:`fastbn.norms`).  Everything stays on the device and runs
on the caller's stream; results are the caller's kind of array.

Group and instance norm: per-(n, c) moments and backward sums by the planes kernels on
the view ``(1, N * C, S)``, group merges and coefficients per (n, c), then the
elementwise kernels on that view.  Channel-last input is seen through its channel-first
strided view, which the stages copy into kernel order (a transpose copy: a simple,
correct path; a batched-rows reduction like the CPU's would save it).

Layer norm: per-row moments by the planes kernels on ``(1, M, K)`` and the rows'
coefficients by the batch-norm per-channel kernel; the per-column affine and the
column sums of the backward are batch norm's apply and sums kernels on the (M, K)
rows view (kept K).
"""

import numpy as np

from .. import dtypes
from ..coefficients import BackwardCoefficients, ForwardCoefficients
from ..geometry import batch_norm_geometry, dense_strides, instance_geometry, layer_norm_geometry
from . import copies, groups, launching, stages, streams, workspace
from .arrays import as_numba, empty, flat, strided_view
from .plans import channel_grid

FLOAT64 = np.dtype(np.float64)


def _launch(kernel, size, stream, *args):
    grid, block = channel_grid(size)
    launching.launch(kernel, grid, block, stream, *args)


def _scratch(caller, stream, name, shape, dtype):
    """Fresh numba device arrays (``shape[0]`` of ``shape[1:]``) for values that stay inside a call."""
    block = empty(as_numba(caller), shape, dtype, stream=stream)
    return tuple(block[i] for i in range(shape[0]))


def _vector(a, stream):
    """Numba view of a device array as a flat vector (copied when not C-contiguous)."""
    a = as_numba(a)
    if a.is_c_contiguous():
        return flat(a)
    dense = empty(a, a.shape, a.dtype, stream=stream)
    copies.copy(a, dense, stream)
    return flat(dense)


def _channel_first(a, layout):
    """Numba array ``a`` in ``layout`` seen as (N, C, spatial...) (a strided view)."""
    if layout != "NHWC" or a.ndim <= 2:
        return a
    order = (0, a.ndim - 1, *range(1, a.ndim - 1))
    return strided_view(a, tuple(a.shape[i] for i in order), tuple(a.strides[i] for i in order))


def _output(caller, out, layout, dtype, stream):
    """``(result, channel-first numba view of it)``: ``out`` or a fresh C-order array like ``caller``."""
    result = empty(caller, tuple(caller.shape), dtype, stream=stream) if out is None else out
    return result, _channel_first(as_numba(result), layout)


# --------------------------------------------------------------------------- group and instance norm

def group_forward(x, num_groups, weight, bias, eps, running_mean, running_var, momentum, layout, out, dtype):
    """``(y, mean, invstd)`` of group norm (instance norm: ``num_groups == C``; the
    running statistics updated in place as PyTorch does), mean and invstd (N, G) in the
    statistics dtype (float64; float32 for float16 storage, as batch norm)."""
    with streams.on_device_of(x):
        return _group_forward(x, num_groups, weight, bias, eps, running_mean, running_var, momentum, layout, out,
                              dtype)


def _group_forward(x, num_groups, weight, bias, eps, running_mean, running_var, momentum, layout, out, dtype):
    policy = dtypes.policy(dtype)
    stream = streams.for_array(x)
    xc = _channel_first(as_numba(x), layout)
    geom = instance_geometry(xc.shape, xc.strides, xc.dtype.itemsize)
    num_n, num_c = xc.shape[0], xc.shape[1]
    size = num_n * num_c
    m = stages.moments(xc, geom)
    statistics = tuple(empty(x, (num_n, num_groups), policy.statistics, stream=stream) for _ in range(2))
    save_mean, save_invstd = (flat(as_numba(v)) for v in statistics)
    channel_mean, channel_invstd = _scratch(x, stream, "channel", (2, size), FLOAT64)
    center, scale, shift = _scratch(x, stream, "coefficients", (3, size), policy.compute)
    weight_n, bias_n = as_numba(weight), as_numba(bias)
    _launch(groups.group_forward_coefficients, size, stream, m.count, m.mean, m.m2, num_c // num_groups,
            scale if weight is None else weight_n, shift if bias is None else bias_n, weight is not None,
            bias is not None, eps, dtypes.largest(policy.compute), channel_mean, channel_invstd, save_mean,
            save_invstd, center, scale, shift)
    if running_mean is not None:
        tile_mean, tile_var = _scratch(x, stream, "running", (2, size), FLOAT64)
        _launch(groups.instance_running_update, num_c, stream, m.count, m.mean, m.m2, momentum, tile_mean,
                tile_var, as_numba(running_mean), as_numba(running_var))
    y, target = _output(x, out, layout, dtype, stream)
    stages.apply(xc, ForwardCoefficients(center, scale, shift, None, None), geom, target)
    return (y, *statistics)


def group_backward(dy, x, num_groups, mean, invstd, weight, layout, out, dtype):
    """``(dx, dweight, dbias)`` of group norm; dweight and dbias (C,) in the parameter dtype."""
    with streams.on_device_of(x):
        return _group_backward(dy, x, num_groups, mean, invstd, weight, layout, out, dtype)


def _group_backward(dy, x, num_groups, mean, invstd, weight, layout, out, dtype):
    policy = dtypes.policy(dtype)
    stream = streams.for_array(x)
    xc, dyc = _channel_first(as_numba(x), layout), _channel_first(as_numba(dy), layout)
    geom = instance_geometry(xc.shape, xc.strides, xc.dtype.itemsize)
    num_n, num_c = xc.shape[0], xc.shape[1]
    size = num_n * num_c
    group_size = num_c // num_groups
    group_mean, group_invstd = _vector(mean, stream), _vector(invstd, stream)
    (channel_mean,) = _scratch(x, stream, "channel", (1, size), FLOAT64)
    _launch(groups.expand_groups, size, stream, group_mean, group_size, channel_mean)
    sums = stages.backward_sums(dyc, xc, channel_mean, geom)
    coefficients = _scratch(x, stream, "coefficients", (4, size), policy.compute)
    weight_n = as_numba(weight)
    count = float(xc.size // (num_n * num_groups))
    _launch(groups.group_backward_coefficients, size, stream, count, sums.sum_dy, sums.sum_dy_xmu, group_mean,
            group_invstd, group_size, coefficients[1] if weight is None else weight_n, weight is not None,
            dtypes.largest(policy.compute), *coefficients)
    scratch_dweight, scratch_dbias = _scratch(x, stream, "gradients", (2, size), FLOAT64)
    dweight, dbias = (empty(x, (num_c,), policy.parameters, stream=stream) for _ in range(2))
    _launch(groups.group_parameter_gradients, num_c, stream, sums.sum_dy, sums.sum_dy_xmu, group_invstd,
            group_size, scratch_dweight, scratch_dbias, as_numba(dweight), as_numba(dbias))
    dx, target = _output(x, out, layout, dtype, stream)
    stages.backward_apply(dyc, xc, BackwardCoefficients(*coefficients), geom, target)
    return dx, dweight, dbias


# --------------------------------------------------------------------------- layer norm

def _rows_view(a, num_rows, width):
    """Dense C-order numba array ``a`` as (M, K)."""
    itemsize = a.dtype.itemsize
    return strided_view(a, (num_rows, width), (width * itemsize, itemsize))


def _column_geometry(num_rows, width, itemsize):
    """Batch norm's geometry of the (M, K) view: rows kernels keeping the K columns."""
    return batch_norm_geometry((num_rows, width), dense_strides((num_rows, width), itemsize, (0, 1)), itemsize,
                               "NCHW")


def _column_coefficients(caller, stream, weight, bias, width, policy):
    center, scale, shift = _scratch(caller, stream, "columns", (3, width), policy.compute)
    _launch(groups.column_coefficients, width, stream, scale if weight is None else as_numba(weight).reshape(width),
            shift if bias is None else as_numba(bias).reshape(width), weight is not None, bias is not None,
            center, scale, shift)
    return ForwardCoefficients(center, scale, shift, None, None)


def layer_forward(x, num_normalized, weight, bias, eps, out, dtype):
    """``(y, mean, invstd)`` of layer norm over the trailing ``num_normalized`` axes;
    mean and invstd of shape ``x.shape[:-num_normalized]`` in the statistics dtype."""
    with streams.on_device_of(x):
        policy = dtypes.policy(dtype)
        stream = streams.for_array(x)
        a = as_numba(x)
        geom = layer_norm_geometry(a.shape, a.strides, a.dtype.itemsize, num_normalized)
        num_rows, width = geom.kept, geom.inner
        m = stages.moments(x, geom)
        rows = stages.forward_coefficients(m.count, m.mean, m.m2, True, None, None, eps, None, None, 0.0, False,
                                           dtype)
        lead = tuple(a.shape[:a.ndim - num_normalized])
        in_place = out is not None and as_numba(out).is_c_contiguous()
        y = out if in_place else empty(x, tuple(a.shape), dtype, stream=stream)
        stages.apply(x, rows, geom, as_numba(y))
        if weight is not None or bias is not None:
            y2 = _rows_view(as_numba(y), num_rows, width)
            columns = _column_coefficients(x, stream, weight, bias, width, policy)
            stages.apply(y2, columns, _column_geometry(num_rows, width, a.dtype.itemsize), y2)
        if out is not None and not in_place:
            copies.copy(as_numba(y), as_numba(out), stream)
            y = out
        return y, rows.mean.reshape(lead), rows.invstd.reshape(lead)


def layer_backward(dy, x, num_normalized, mean, invstd, weight, out, dtype):
    """``(dx, dweight, dbias)`` of layer norm; dweight and dbias shaped like the
    normalized axes, in the parameter dtype."""
    with streams.on_device_of(x):
        policy = dtypes.policy(dtype)
        stream = streams.for_array(x)
        a, g = as_numba(x), as_numba(dy)
        geom = layer_norm_geometry(a.shape, a.strides, a.dtype.itemsize, num_normalized)
        num_rows, width = geom.kept, geom.inner
        columns = _column_geometry(num_rows, width, a.dtype.itemsize)
        a, g = as_numba(stages.as_dense(a, geom)), as_numba(stages.as_dense(g, geom))
        g2 = _rows_view(g, num_rows, width)
        row_mean, row_invstd = _vector(mean, stream), _vector(invstd, stream)
        big = dtypes.largest(policy.compute)
        # dx: the batch-norm backward per row of g = dy * weight[k].
        weighted = g2
        if weight is not None:
            weighted = as_numba(stages.apply(g2, _column_coefficients(x, stream, weight, None, width, policy),
                                             columns, None))
        weighted = strided_view(weighted, a.shape, a.strides)
        sums = stages.backward_sums(weighted, a, row_mean, geom)
        row_coefficients = stages.backward_coefficients(sums, row_mean, row_invstd, None, True, dtype)
        dx = empty(x, tuple(a.shape), dtype, stream=stream)
        stages.backward_apply(weighted, a, row_coefficients, geom, as_numba(dx))
        # dweight, dbias: column sums of dy * x_hat and dy (batch norm's sums over rows).
        scratch_mean, scratch_invstd = _scratch(x, stream, "rows", (2, num_rows), FLOAT64)
        center, scale, shift = _scratch(x, stream, "normalized", (3, num_rows), policy.compute)
        _launch(groups.normalized_coefficients, num_rows, stream, row_mean, row_invstd, big, scratch_mean,
                scratch_invstd, center, scale, shift)
        x_hat = as_numba(stages.apply(a, ForwardCoefficients(center, scale, shift, None, None), geom, None))
        zero = workspace.scratch(streams.device_of(x), stream, "layer.zero", width, FLOAT64, zeroed=True)
        column_sums = stages.backward_sums(g2, _rows_view(x_hat, num_rows, width), zero, columns)
        normalized = tuple(a.shape[a.ndim - num_normalized:])
        dweight, dbias = (empty(x, normalized, policy.parameters, stream=stream) for _ in range(2))
        _launch(groups.column_gradients, width, stream, column_sums.sum_dy, column_sums.sum_dy_xmu,
                flat(as_numba(dweight)), flat(as_numba(dbias)))
        if out is not None:
            copies.copy(as_numba(dx), as_numba(out), stream)
            dx = out
        return dx, dweight, dbias

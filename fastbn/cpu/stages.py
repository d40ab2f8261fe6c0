"""The pipeline's stages on the CPU: moments -> merge -> coefficients -> apply, and for
backward sums -> coefficients -> apply.

Each stage launches the kernel of the family the :class:`~fastbn.geometry.Geometry`
names (planes or rows) on views of the caller's arrays; the per-channel algebra is
:mod:`fastbn.algebra`, compiled into :mod:`fastbn.cpu.channels`.  Arguments arrive
validated (by :mod:`fastbn._api` or :mod:`fastbn.stages`).
"""

import numpy as np

from .. import dtypes
from ..coefficients import BackwardCoefficients, ForwardCoefficients
from ..geometry import PLANES, batch_norm_geometry
from ..stats import BackwardSums, Moments
from . import channels, planes, plans, rows, small, views
from ._jit import guarded

# Every parallel launch goes through the thread/fork guard (see fastbn.cpu._jit).
planes_moments = guarded(planes.planes_moments)
planes_apply = guarded(planes.planes_apply)
planes_backward_sums = guarded(planes.planes_backward_sums)
planes_backward_apply = guarded(planes.planes_backward_apply)
rows_moments = guarded(rows.rows_moments)
rows_apply = guarded(rows.rows_apply)
rows_backward_sums = guarded(rows.rows_backward_sums)
rows_backward_apply = guarded(rows.rows_backward_apply)
merge_partials = guarded(channels.merge_partials)

as_dense = views.as_dense
new_output = views.new_output


def geometry(x, layout):
    """The batch-norm :class:`~fastbn.geometry.Geometry` of NumPy array ``x``."""
    return batch_norm_geometry(x.shape, x.strides, x.itemsize, layout)


# --------------------------------------------------------------------------- statistics

def moments(x, geom):
    """Per-channel :class:`Moments` of ``x`` (float64 (C,)), one pass."""
    num_channels = geom.kept
    result = Moments(np.empty(num_channels), np.empty(num_channels), np.empty(num_channels))
    if x.size <= small.SMALL_SIZE:
        small.small_moments(views.block_view(x, geom), *result)
        return result
    xv = views.kernel_view(x, geom)
    if not plans.reduces_as_rows(xv, geom.family):
        shape, counts = plans.plane_partials(xv)
        part_mean, part_m2 = np.empty(shape), np.empty(shape)
        planes_moments(xv, plans.PLANE_BLOCK, part_mean, part_m2)
    else:
        pivot = plans.channel_pivot(views.storage_values(xv, x.dtype))
        all_counts, all_means, all_m2 = [], [], []
        for (piece,), expand in plans.row_pieces(xv):
            chan = expand(np.arange(num_channels))
            rows_per_chunk, cols_per_block = plans.row_tiles(piece.shape[1], chan)
            chunk_counts = plans.chunk_counts(piece.shape[0], rows_per_chunk)
            pm = np.empty((chunk_counts.size, num_channels))
            p2 = np.empty_like(pm)
            rows_moments(piece, chan, pivot, expand(pivot), rows_per_chunk, cols_per_block, pm, p2)
            all_means.append(pm)
            all_m2.append(p2)
            all_counts.append(chunk_counts * (piece.shape[1] // num_channels))
        counts = np.concatenate(all_counts)
        part_mean = np.concatenate(all_means) if len(all_means) > 1 else all_means[0]
        part_m2 = np.concatenate(all_m2) if len(all_m2) > 1 else all_m2[0]
    merge_partials(counts, part_mean, part_m2, *result)
    return result


def merge_moments(a, b):
    """The :class:`Moments` of the union of ``a``'s and ``b``'s data."""
    a = Moments(*(np.ascontiguousarray(v, dtype=np.float64) for v in a))
    b = Moments(*(np.ascontiguousarray(v, dtype=np.float64) for v in b))
    result = Moments(*(np.empty_like(v) for v in a))
    channels.merge_moments(*a, *b, *result)
    return result


@np.errstate(all="ignore")
def moments_var(m):
    """Population variance ``M2 / count`` (NaN where count is 0)."""
    return np.asarray(m.m2, dtype=np.float64) / m.count


def mean_var(m, dtype):
    """``(mean, population var)`` of :class:`Moments` ``m`` in the statistics dtype of
    inputs of ``dtype`` (float64; float32 for 16-bit storage)."""
    statistics = dtypes.policy(dtype).statistics
    return (np.asarray(m.mean).astype(statistics, copy=False),
            moments_var(m).astype(statistics, copy=False))


@np.errstate(all="ignore")
def moments_invstd(m, eps):
    """``1 / sqrt(var + eps)`` of :class:`Moments` ``m``."""
    return 1.0 / np.sqrt(moments_var(m) + eps)


@np.errstate(all="ignore")
def merge_sums(a, b):
    """The :class:`BackwardSums` of the union of ``a``'s and ``b``'s data."""
    return BackwardSums(*(np.add(u, v, dtype=np.float64) for u, v in zip(a, b)))


# --------------------------------------------------------------------------- forward

def _placeholder(v, like):
    return like if v is None else v


def forward_coefficients(count, mean, second, from_moments, weight, bias, eps,
                         running_mean, running_var, momentum, update_running, dtype):
    """Per-channel :class:`ForwardCoefficients` for inputs of ``dtype``, and the
    running-statistics update (in place, when ``update_running``).

    ``second`` is M2 when ``from_moments`` (with ``count``), else the variance.
    """
    policy = dtypes.policy(dtype)
    num_channels = mean.shape[0]
    vectors = np.empty((3, num_channels), policy.compute)
    center, scale, shift = vectors
    # A batch mean already in the statistics dtype is returned as it is; running
    # statistics are never written (they may be read-only) nor returned as save_mean.
    reuse = from_moments and mean.dtype == policy.statistics
    save_mean = mean if reuse else np.empty(num_channels, policy.statistics)
    save_invstd = np.empty(num_channels, policy.statistics)
    channels.forward_coefficients(
        _placeholder(count, mean), mean, second, from_moments,
        _placeholder(weight, scale), _placeholder(bias, scale), weight is not None, bias is not None,
        eps, dtypes.largest(policy.compute), momentum,
        _placeholder(running_mean, scale), _placeholder(running_var, scale), update_running,
        save_mean, save_invstd, center, scale, shift)
    return ForwardCoefficients(center, scale, shift, save_mean, save_invstd)


def epilogue_floor(activation, dtype):
    """The apply kernels' lower bound in compute dtype ``dtype``: 0 for ``"relu"``
    (``max(v, 0)``), -inf for none (``max(v, -inf)`` is ``v``, NaN included)."""
    return np.asarray(0.0 if activation == "relu" else -np.inf, dtype=dtype)[()]


def apply(x, coefficients, geom, out, residual=None, activation=None):
    """``y = activation((x - center) * scale + shift + residual)`` per channel, one pass;
    ``out`` when given.  ``residual`` (like ``x``) and ``activation`` (None or "relu")
    are optional."""
    inputs = (x,) if residual is None else (x, residual)
    target = views.output_target(out, inputs, geom)
    xv = views.kernel_view(x, geom)
    rv = _optional_view(residual, geom)
    _apply_kernel(xv, rv, views.kernel_view(target, geom), geom, coefficients.center, coefficients.scale,
                  coefficients.shift, epilogue_floor(activation, coefficients.scale.dtype))
    return views.finish_output(target, out)


def _optional_view(a, geom):
    """The kernel view of optional array ``a`` (None stays None: the kernels compile a
    specialization without its loop, so plain calls compile no epilogue code)."""
    return None if a is None else views.kernel_view(a, geom)


def _small(v, shape):
    """Optional kernel view ``v`` as the small kernels' 3-D view."""
    return None if v is None else v.reshape(shape)


def _row_pieces(*arrays):
    """:func:`plans.row_pieces` of the given views, None ones passed through as None."""
    given = [a for a in arrays if a is not None]
    for views_, expand in plans.row_pieces(*given):
        pieces = iter(views_)
        yield tuple(None if a is None else next(pieces) for a in arrays), expand


def _apply_kernel(xv, rv, yv, geom, center, scale, shift, floor):
    if xv.size <= small.SMALL_SIZE:
        shape = geom.view_shape
        small.small_apply(xv.reshape(shape), _small(rv, shape), center, scale, shift, floor, yv.reshape(shape))
    elif geom.family == PLANES:
        planes_apply(xv, rv, center, scale, shift, floor, plans.PLANE_BLOCK, yv)
    else:
        for (xp, yp, rp), expand in _row_pieces(xv, yv, rv):
            rows_apply(xp, rp, expand(center), expand(scale), expand(shift), floor,
                       plans.rows_per_chunk(xp.shape[1]), yp)


# --------------------------------------------------------------------------- backward

@np.errstate(all="ignore")  # Inf/NaN data propagate as IEEE values, without warnings
def backward_sums(dy, x, mean, geom, y=None):
    """Per-channel :class:`BackwardSums`: count, sum(g) and sum(g * (x - mean)), float64,
    with ``g = dy``, or ``g = 0 where y <= 0 else dy`` (the ReLU mask) when the forward's
    output ``y`` is given."""
    num_channels = geom.kept
    if x.size <= small.SMALL_SIZE:
        result = BackwardSums(np.empty(num_channels), np.empty(num_channels), np.empty(num_channels))
        yb = None if y is None else views.block_view(y, geom)
        small.small_backward_sums(views.block_view(dy, geom), views.block_view(x, geom), yb, mean, *result)
        return result
    xv = views.kernel_view(x, geom)
    dyv = views.kernel_view(dy, geom)
    yv = _optional_view(y, geom)
    mean = np.asarray(mean, dtype=np.float64)
    count = np.full(num_channels, float(geom.count))
    if not plans.reduces_as_rows(xv, geom.family):
        shape, _ = plans.plane_partials(xv)
        part_dy, part_dy_xmu = np.empty(shape), np.empty(shape)
        planes_backward_sums(dyv, xv, yv, mean, plans.PLANE_BLOCK, part_dy, part_dy_xmu)
        return BackwardSums(count, part_dy.sum(axis=0), part_dy_xmu.sum(axis=0))
    sum_dy, sum_dy_xmu = np.zeros(num_channels), np.zeros(num_channels)
    for (gp, xp, yp), expand in _row_pieces(dyv, xv, yv):
        chan = expand(np.arange(num_channels))
        rows_per_chunk, cols_per_block = plans.row_tiles(xp.shape[1], chan)
        num_chunks = -(-xp.shape[0] // rows_per_chunk)
        part_dy = np.empty((num_chunks, num_channels))
        part_dy_xmu = np.empty_like(part_dy)
        rows_backward_sums(gp, xp, yp, chan, expand(mean), rows_per_chunk, cols_per_block,
                           part_dy, part_dy_xmu)
        sum_dy += part_dy.sum(axis=0)
        sum_dy_xmu += part_dy_xmu.sum(axis=0)
    return BackwardSums(count, sum_dy, sum_dy_xmu)


def backward_coefficients(sums, mean, invstd, weight, training, dtype):
    """Per-channel :class:`BackwardCoefficients` of the dx pass for inputs of ``dtype``."""
    policy = dtypes.policy(dtype)
    vectors = np.empty((4, invstd.shape[0]), policy.compute)
    center, dy_scale, x_scale, shift = vectors
    channels.backward_coefficients(sums.count, sums.sum_dy, sums.sum_dy_xmu, mean, invstd,
                                   _placeholder(weight, dy_scale), weight is not None, training,
                                   dtypes.largest(policy.compute), center, dy_scale, x_scale, shift)
    return BackwardCoefficients(center, dy_scale, x_scale, shift)


def parameter_gradients(sums, invstd, dtype):
    """``(dweight, dbias)`` of this data's sums, (C,) in the parameter dtype of ``dtype``."""
    grads = np.empty((2, invstd.shape[0]), dtypes.policy(dtype).parameters)
    channels.weight_bias_gradients(sums.sum_dy, sums.sum_dy_xmu, invstd, grads[0], grads[1])
    return grads[0], grads[1]


def backward_apply(dy, x, coefficients, geom, out, y=None, masked_dy=None):
    """``dx = g * dy_scale + (x - center) * x_scale + shift`` per channel; ``out`` when given.

    ``g = dy``, or ``dy`` masked by ``y <= 0`` (ReLU) when the forward's output ``y`` is
    given; ``masked_dy`` (a fresh array like ``x``, only with ``y``) receives ``g``.
    """
    target = views.output_target(out, (dy, x) if y is None else (dy, x, y), geom)
    dyv, xv, dxv = (views.kernel_view(a, geom) for a in (dy, x, target))
    yv = _optional_view(y, geom)
    gv = _optional_view(masked_dy, geom)
    c = coefficients
    if x.size <= small.SMALL_SIZE:
        shape = geom.view_shape
        small.small_backward_apply(dyv.reshape(shape), xv.reshape(shape), _small(yv, shape), c.center,
                                   c.dy_scale, c.x_scale, c.shift, dxv.reshape(shape), _small(gv, shape))
    elif geom.family == PLANES:
        planes_backward_apply(dyv, xv, yv, c.center, c.dy_scale, c.x_scale, c.shift, plans.PLANE_BLOCK, dxv, gv)
    else:
        for (gp, xp, dp, yp, mp), expand in _row_pieces(dyv, xv, dxv, yv, gv):
            rows_backward_apply(gp, xp, yp, expand(c.center), expand(c.dy_scale), expand(c.x_scale),
                                expand(c.shift), plans.rows_per_chunk(xp.shape[1]), dp, mp)
    return views.finish_output(target, out)


def backward_scale(dy, coefficients, geom, out):
    """``dx = dy * dy_scale`` (eval mode, where the other coefficients are 0): one read
    pass fewer than :func:`backward_apply`."""
    target = views.output_target(out, (dy,), geom)
    c = coefficients
    dyv = views.kernel_view(dy, geom)
    _apply_kernel(dyv, None, views.kernel_view(target, geom), geom, c.center, c.dy_scale, c.shift,
                  epilogue_floor(None, c.dy_scale.dtype))
    return views.finish_output(target, out)

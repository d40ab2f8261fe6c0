"""Layer, group and instance norm on the CPU: the batch-norm stages of
:mod:`fastbn.cpu.stages` driven by other geometries (:mod:`fastbn.geometry`), plus the
per-group kernels (:mod:`fastbn.cpu.groups`) and layer norm's per-column affine
(:mod:`fastbn.cpu.layer`).  Arguments arrive validated by :mod:`fastbn.norms`.

Group and instance norm compute per-(n, c) moments, Chan-merge them per (n, g), and
apply per-(n, c) coefficient vectors: channel-first with the batch-norm planes kernels
on the view ``(1, N * C, S)``; channel-last with the batched rows kernels
(:mod:`fastbn.cpu.batched_rows`) on the view ``(N, S, C)``, no transpose.
"""

import math

import numpy as np

from .. import _checks, dtypes
from ..coefficients import BackwardCoefficients, ForwardCoefficients
from ..geometry import batch_norm_geometry, instance_geometry, layer_norm_geometry
from ..stats import Moments
from . import batched_rows, groups, layer, plans, small, stages, views
from ._jit import guarded

batched_moments = guarded(batched_rows.batched_rows_moments)
batched_apply = guarded(batched_rows.batched_rows_apply)
batched_backward_sums = guarded(batched_rows.batched_rows_backward_sums)
batched_backward_apply = guarded(batched_rows.batched_rows_backward_apply)
layer_forward_kernel = guarded(layer.layer_forward)
layer_backward_kernel = guarded(layer.layer_backward)


def _launch(kernel, size):
    """The parallel kernel, or its serial build for small tensors (no parallel region)."""
    return kernel.serial if size <= small.SMALL_SIZE else kernel


# --------------------------------------------------------------------------- group and instance norm

class _PerChannel:
    """How one group-norm call sees ``x``: the per-(n, c) planes view (1, N * C, S) of
    channel-first memory, or the batched rows view (N, S, C) of channel-last memory."""

    def __init__(self, x, layout):
        self.channel_last = layout == "NHWC" and x.ndim > 2
        if self.channel_last:
            self.geometry = batch_norm_geometry(x.shape, x.strides, x.itemsize, "NHWC")
        else:
            self.geometry = instance_geometry(x.shape, x.strides, x.itemsize)
        self.num_samples, self.num_channels = x.shape[0], x.shape[-1 if self.channel_last else 1]
        self.num_rows = math.prod(x.shape) // (self.num_samples * self.num_channels)
        self.rows_per_chunk = plans.rows_per_chunk(self.num_channels)
        self.num_chunks = -(-self.num_rows // self.rows_per_chunk)
        self.size = math.prod(x.shape)

    def dense(self, a):
        return views.as_dense(a, self.geometry)

    def batched(self, a):
        """A dense channel-last array as its (N, S, C) view."""
        return a.reshape(self.num_samples, self.num_rows, self.num_channels)

    def per_sample(self, v):
        return v.reshape(self.num_samples, self.num_channels)

    def item_partials(self):
        return np.empty((2, self.num_samples * self.num_chunks, self.num_channels))


def _by_chunk(part, view):
    """Per-item partials (N * chunks, C) as (chunks, N * C): chunk-major, for the merge."""
    shape = (view.num_samples, view.num_chunks, view.num_channels)
    return np.ascontiguousarray(part.reshape(shape).transpose(1, 0, 2)).reshape(view.num_chunks, -1)


def _channel_moments(x, view):
    if not view.channel_last:
        return stages.moments(x, view.geometry)
    part_mean, part_m2 = view.item_partials()
    _launch(batched_moments, view.size)(view.batched(x), view.rows_per_chunk, part_mean, part_m2)
    result = Moments(*np.empty((3, view.num_samples * view.num_channels)))
    _launch(stages.merge_partials, view.size)(plans.chunk_counts(view.num_rows, view.rows_per_chunk),
                                              _by_chunk(part_mean, view), _by_chunk(part_m2, view), *result)
    return result


def _channel_sums(dy, x, channel_mean, view):
    """Per-(n, c) (sum(dy), sum(dy * (x - mean))), float64 (N * C,)."""
    if not view.channel_last:
        sums = stages.backward_sums(dy, x, channel_mean, view.geometry)
        return sums.sum_dy, sums.sum_dy_xmu
    part_dy, part_dy_xmu = view.item_partials()
    _launch(batched_backward_sums, view.size)(view.batched(dy), view.batched(x), view.per_sample(channel_mean),
                                              view.rows_per_chunk, part_dy, part_dy_xmu)
    shape = (view.num_samples, view.num_chunks, view.num_channels)
    return part_dy.reshape(shape).sum(axis=1).ravel(), part_dy_xmu.reshape(shape).sum(axis=1).ravel()


def _placeholder(v, size, dtype):
    return np.empty(size, dtype) if v is None else v


def group_forward(x, num_groups, weight, bias, eps, running_mean, running_var, momentum, layout, out, dtype):
    """``(y, mean, invstd)`` of group norm (instance norm: ``num_groups == C``), mean and
    invstd float64 (N, G).  With running statistics (instance norm only) they are updated
    as PyTorch does: per (n, c), then averaged over n."""
    _checks.check_not_16_bit(dtype, "x", "group and instance norm")
    policy = dtypes.policy(dtype)
    view = _PerChannel(x, layout)
    x = view.dense(x)
    num_n, num_c = view.num_samples, view.num_channels
    m = _channel_moments(x, view)
    group = Moments(*np.empty((3, num_n * num_groups)))
    groups.merge_groups(*m, num_c // num_groups, *group)
    update = running_mean is not None
    running = [np.tile(np.asarray(r, np.float64), num_n) if update else np.empty(0) for r in (running_mean, running_var)]
    center, scale, shift = np.empty((3, num_n * num_c), policy.compute)
    save_invstd = np.empty(num_n * num_groups)
    groups.group_forward_coefficients(
        *group, _placeholder(weight, num_c, policy.parameters), _placeholder(bias, num_c, policy.parameters),
        weight is not None, bias is not None, eps, dtypes.largest(policy.compute), momentum, *running, update,
        save_invstd, center, scale, shift)
    if update:
        running_mean[...] = running[0].reshape(num_n, num_c).mean(axis=0)
        running_var[...] = running[1].reshape(num_n, num_c).mean(axis=0)
    if not view.channel_last:
        y = stages.apply(x, ForwardCoefficients(center, scale, shift, None, None), view.geometry, out)
    else:
        target = views.output_target(out, (x,), view.geometry)
        _launch(batched_apply, view.size)(view.batched(x), *(view.per_sample(v) for v in (center, scale, shift)),
                                          view.rows_per_chunk, view.batched(target))
        y = views.finish_output(target, out)
    return y, group.mean.reshape(num_n, num_groups), save_invstd.reshape(num_n, num_groups)


def group_backward(dy, x, num_groups, mean, invstd, weight, layout, out, dtype):
    """``(dx, dweight, dbias)`` of group norm; dweight and dbias (C,) in the parameter dtype."""
    _checks.check_not_16_bit(dtype, "x", "group and instance norm")
    policy = dtypes.policy(dtype)
    view = _PerChannel(x, layout)
    x, dy = view.dense(x), view.dense(dy)
    num_n, num_c = view.num_samples, view.num_channels
    group_mean = np.ascontiguousarray(mean, np.float64).ravel()
    group_invstd = np.ascontiguousarray(invstd, np.float64).ravel()
    sum_dy, sum_dy_xmu = _channel_sums(dy, x, np.repeat(group_mean, num_c // num_groups), view)
    count = np.full(num_n * num_groups, float(view.size // (num_n * num_groups)))
    coefficients = np.empty((4, num_n * num_c), policy.compute)
    grads = np.empty((2, num_c))
    groups.group_backward_coefficients(
        count, sum_dy, sum_dy_xmu, group_mean, group_invstd, _placeholder(weight, num_c, policy.parameters),
        weight is not None, dtypes.largest(policy.compute), grads[0], grads[1], *coefficients)
    if not view.channel_last:
        dx = stages.backward_apply(dy, x, BackwardCoefficients(*coefficients), view.geometry, out)
    else:
        target = views.output_target(out, (dy, x), view.geometry)
        _launch(batched_backward_apply, view.size)(view.batched(dy), view.batched(x),
                                                   *(view.per_sample(v) for v in coefficients),
                                                   view.rows_per_chunk, view.batched(target))
        dx = views.finish_output(target, out)
    grads = grads.astype(policy.parameters)
    return dx, grads[0], grads[1]


# --------------------------------------------------------------------------- layer norm

def _affine(v, fill, size, dtype):
    return np.full(size, fill, dtype) if v is None else np.ascontiguousarray(v, dtype).ravel()


def _rows(a, geom):
    return views.kernel_view(a, geom).reshape(geom.kept, geom.inner)


def layer_forward(x, num_normalized, weight, bias, eps, out, dtype):
    """``(y, mean, invstd)`` of layer norm over the trailing ``num_normalized`` axes; mean
    and invstd float64 of shape ``x.shape[:-num_normalized]``."""
    _checks.check_not_16_bit(dtype, "x", "layer norm")
    policy = dtypes.policy(dtype)
    geom = layer_norm_geometry(x.shape, x.strides, x.itemsize, num_normalized)
    x = views.as_dense(x, geom)
    num_rows, width = geom.kept, geom.inner
    save_mean, save_invstd = np.empty((2, num_rows))
    center, scale, shift = np.empty((3, num_rows), policy.compute)
    target = views.output_target(out, (x,), geom)
    _launch(layer_forward_kernel, x.size)(
        _rows(x, geom), _affine(weight, 1, width, policy.compute), _affine(bias, 0, width, policy.compute), eps,
        dtypes.largest(policy.compute), plans.rows_per_chunk(width), save_mean, save_invstd, center, scale, shift,
        _rows(target, geom))
    lead = x.shape[:x.ndim - num_normalized]
    return views.finish_output(target, out), save_mean.reshape(lead), save_invstd.reshape(lead)


def layer_backward(dy, x, num_normalized, mean, invstd, weight, out, dtype):
    """``(dx, dweight, dbias)`` of layer norm; dweight and dbias shaped like the normalized
    axes, in the parameter dtype."""
    _checks.check_not_16_bit(dtype, "x", "layer norm")
    policy = dtypes.policy(dtype)
    geom = layer_norm_geometry(x.shape, x.strides, x.itemsize, num_normalized)
    x, dy = views.as_dense(x, geom), views.as_dense(dy, geom)
    num_rows, width = geom.kept, geom.inner
    rows_per_chunk = plans.rows_per_chunk(width)
    num_chunks = -(-num_rows // rows_per_chunk)
    part_dweight, part_dbias = np.empty((2, num_chunks, width))
    coefficients = np.empty((4, num_rows), policy.compute)
    target = views.output_target(out, (dy, x), geom)
    _launch(layer_backward_kernel, x.size)(
        _rows(dy, geom), _rows(x, geom), np.ascontiguousarray(mean, np.float64).ravel(),
        np.ascontiguousarray(invstd, np.float64).ravel(), _affine(weight, 1, width, policy.compute),
        dtypes.largest(policy.compute), rows_per_chunk, *coefficients, part_dweight, part_dbias, _rows(target, geom))
    normalized = x.shape[x.ndim - num_normalized:]
    dweight = part_dweight.sum(axis=0).astype(policy.parameters).reshape(normalized)
    dbias = part_dbias.sum(axis=0).astype(policy.parameters).reshape(normalized)
    return views.finish_output(target, out), dweight, dbias

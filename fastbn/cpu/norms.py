"""Layer, group and instance norm on the CPU: the batch-norm stages of
:mod:`fastbn.cpu.stages` driven by other geometries (:mod:`fastbn.geometry`), plus the
per-group kernels (:mod:`fastbn.cpu.groups`) and layer norm's per-column affine
(:mod:`fastbn.cpu.layer`).  Arguments arrive validated by :mod:`fastbn.norms`.

Group and instance norm compute per-(n, c) moments with the batch-norm statistics
kernels (channel-first: the planes view ``(1, N * C, S)``; channel-last: the rows view
of each sample, no transpose), Chan-merge them per (n, g), and apply per-(n, c)
coefficient vectors with the batch-norm apply kernels.
"""

import math

import numpy as np

from .. import dtypes
from ..coefficients import BackwardCoefficients, ForwardCoefficients
from ..geometry import batch_norm_geometry, instance_geometry, layer_norm_geometry, sample_geometry
from ..stats import BackwardSums, Moments
from . import groups, layer, plans, small, stages, views
from ._jit import guarded

layer_forward_kernel = guarded(layer.layer_forward)
layer_backward_kernel = guarded(layer.layer_backward)


# --------------------------------------------------------------------------- group and instance norm

class _PerChannel:
    """How one group-norm call sees ``x``: per-(n, c) geometry, per sample when channel-last."""

    def __init__(self, x, layout):
        self.per_sample = layout == "NHWC" and x.ndim > 2
        if self.per_sample:
            self.whole = batch_norm_geometry(x.shape, x.strides, x.itemsize, "NHWC")
            self.geometry = None
        else:
            self.whole = self.geometry = instance_geometry(x.shape, x.strides, x.itemsize)
        self.num_samples, self.num_channels = x.shape[0], x.shape[-1 if self.per_sample else 1]

    def dense(self, a):
        return views.as_dense(a, self.whole)

    def sample(self, a):
        return sample_geometry(a.shape, a.strides, a.itemsize)

    def rows(self, n):
        return slice(n * self.num_channels, (n + 1) * self.num_channels)


def _channel_moments(x, view):
    if not view.per_sample:
        return stages.moments(x, view.geometry)
    parts = [stages.moments(x[n], view.sample(x)) for n in range(view.num_samples)]
    return Moments(*(np.concatenate(field) for field in zip(*parts)))


def _placeholder(v, size, dtype):
    return np.empty(size, dtype) if v is None else v


def group_forward(x, num_groups, weight, bias, eps, running_mean, running_var, momentum, layout, out, dtype):
    """``(y, mean, invstd)`` of group norm (instance norm: ``num_groups == C``), mean and
    invstd float64 (N, G).  With running statistics (instance norm only) they are updated
    as PyTorch does: per (n, c), then averaged over n."""
    policy = dtypes.policy(dtype)
    view = _PerChannel(x, layout)
    x = view.dense(x)
    num_n, num_c = view.num_samples, view.num_channels
    m = _channel_moments(x, view)
    group = Moments(*(np.empty(num_n * num_groups) for _ in range(3)))
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
    coefficients = ForwardCoefficients(center, scale, shift, None, None)
    if not view.per_sample:
        y = stages.apply(x, coefficients, view.geometry, out)
    else:
        target = views.output_target(out, (x,), view.whole)
        for n in range(num_n):
            r = view.rows(n)
            stages.apply(x[n], ForwardCoefficients(center[r], scale[r], shift[r], None, None),
                         view.sample(x), target[n])
        y = views.finish_output(target, out)
    return y, group.mean.reshape(num_n, num_groups), save_invstd.reshape(num_n, num_groups)


def group_backward(dy, x, num_groups, mean, invstd, weight, layout, out, dtype):
    """``(dx, dweight, dbias)`` of group norm; dweight and dbias (C,) in the parameter dtype."""
    policy = dtypes.policy(dtype)
    view = _PerChannel(x, layout)
    x, dy = view.dense(x), view.dense(dy)
    num_n, num_c = view.num_samples, view.num_channels
    group_mean = np.ascontiguousarray(mean, np.float64).ravel()
    group_invstd = np.ascontiguousarray(invstd, np.float64).ravel()
    channel_mean = np.repeat(group_mean, num_c // num_groups)
    if not view.per_sample:
        sums = stages.backward_sums(dy, x, channel_mean, view.geometry)
    else:
        parts = [stages.backward_sums(dy[n], x[n], channel_mean[view.rows(n)], view.sample(x))
                 for n in range(num_n)]
        sums = BackwardSums(*(np.concatenate(field) for field in zip(*parts)))
    count = np.full(num_n * num_groups, float(math.prod(x.shape) // (num_n * num_groups)))
    center, dy_scale, x_scale, shift = np.empty((4, num_n * num_c), policy.compute)
    grads = np.empty((2, num_c))
    groups.group_backward_coefficients(
        count, sums.sum_dy, sums.sum_dy_xmu, group_mean, group_invstd,
        _placeholder(weight, num_c, policy.parameters), weight is not None, dtypes.largest(policy.compute),
        grads[0], grads[1], center, dy_scale, x_scale, shift)
    if not view.per_sample:
        dx = stages.backward_apply(dy, x, BackwardCoefficients(center, dy_scale, x_scale, shift), view.geometry, out)
    else:
        target = views.output_target(out, (dy, x), view.whole)
        for n in range(num_n):
            r = view.rows(n)
            stages.backward_apply(dy[n], x[n], BackwardCoefficients(center[r], dy_scale[r], x_scale[r], shift[r]),
                                  view.sample(x), target[n])
        dx = views.finish_output(target, out)
    grads = grads.astype(policy.parameters)
    return dx, grads[0], grads[1]


# --------------------------------------------------------------------------- layer norm

def _affine(v, fill, size, dtype):
    return np.full(size, fill, dtype) if v is None else np.ascontiguousarray(v, dtype).ravel()


def _rows(a, geom):
    return views.kernel_view(a, geom).reshape(geom.kept, geom.inner)


def _launch(kernel, size):
    """The parallel kernel, or its serial build for small tensors (no parallel region)."""
    return kernel.serial if size <= small.SMALL_SIZE else kernel


def layer_forward(x, num_normalized, weight, bias, eps, out, dtype):
    """``(y, mean, invstd)`` of layer norm over the trailing ``num_normalized`` axes; mean
    and invstd float64 of shape ``x.shape[:-num_normalized]``."""
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

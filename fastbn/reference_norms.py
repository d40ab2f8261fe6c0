"""NumPy float64 reference of layer, group and instance norm (re-exported by
:mod:`fastbn.reference`): two-pass statistics in float64 whatever the input dtype, ``y``
and ``dx`` returned in the input's dtype, statistics float64.  Signatures are those of
:mod:`fastbn.norms`; parameters may be of any float dtype."""

import numpy as np

from . import _checks

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _normalize(x64, axes, eps):
    mean = x64.mean(axis=axes, keepdims=True)
    centered = x64 - mean
    var = (centered * centered).mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    return centered * invstd, mean, invstd


def _backward(dy64, x_hat, invstd, axes):
    """dx of ``x_hat = (x - mean) * invstd`` with statistics over ``axes``, from ``g = dL/dx_hat``."""
    return invstd * (dy64 - dy64.mean(axis=axes, keepdims=True)
                     - x_hat * (dy64 * x_hat).mean(axis=axes, keepdims=True))


def _float64(v, default, shape):
    return np.full(shape, default) if v is None else np.asarray(v, dtype=np.float64)


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Reference layer norm; returns ``(y, mean, invstd)``, statistics float64 of shape
    ``x.shape[:-len(normalized_shape)]``."""
    _checks.check_input(x, "x", FLOAT_DTYPES)
    shape = (normalized_shape,) if np.isscalar(normalized_shape) else tuple(normalized_shape)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    x_hat, mean, invstd = _normalize(np.asarray(x, np.float64), axes, eps)
    y = x_hat * _float64(weight, 1.0, shape) + _float64(bias, 0.0, shape)
    lead = x.shape[:x.ndim - len(shape)]
    return _store(out, y, x.dtype), mean.reshape(lead), invstd.reshape(lead)


def layer_norm_backward(dy, x, normalized_shape, mean, invstd, weight=None, *, out=None):
    """Reference layer-norm gradients ``(dx, dweight, dbias)``, dweight/dbias float64."""
    shape = (normalized_shape,) if np.isscalar(normalized_shape) else tuple(normalized_shape)
    ndim, k = x.ndim, len(shape)
    axes = tuple(range(ndim - k, ndim))
    stat = np.asarray(invstd, np.float64).reshape(x.shape[:ndim - k] + (1,) * k)
    x_hat = (np.asarray(x, np.float64) - np.asarray(mean, np.float64).reshape(stat.shape)) * stat
    dy64 = np.asarray(dy, np.float64)
    lead = tuple(range(ndim - k))
    dx = _backward(dy64 * _float64(weight, 1.0, shape), x_hat, stat, axes)
    return _store(out, dx, x.dtype), (dy64 * x_hat).sum(axis=lead), dy64.sum(axis=lead)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Reference layer norm; returns ``y``."""
    return layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]


def _grouped(a, num_groups, layout):
    """``a`` (N, C, ...) or channel-last, as float64 (N, G, C/G, spatial...) channel-first."""
    a = np.asarray(a, np.float64)
    if layout == "NHWC":
        a = np.moveaxis(a, -1, 1)
    return a.reshape(a.shape[0], num_groups, -1)


def _ungrouped(a, shape, layout):
    if layout == "NHWC" and len(shape) > 2:
        first = (shape[0], shape[-1]) + tuple(shape[1:-1])
        return np.moveaxis(a.reshape(first), 1, -1)
    return a.reshape(shape)


def _per_channel(v, default, x, layout):
    num_channels = x.shape[_checks.channel_axis(x.ndim, layout)]
    shape = [1] * x.ndim
    shape[_checks.channel_axis(x.ndim, layout)] = num_channels
    return _float64(v, default, num_channels).reshape(shape)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout="NCHW", out=None):
    """Reference group norm; returns ``(y, mean, invstd)``, statistics float64 (N, G)."""
    _checks.check_input(x, "x", FLOAT_DTYPES)
    x_hat, mean, invstd = _normalize(_grouped(x, num_groups, layout), (2,), eps)
    y = _ungrouped(x_hat, x.shape, layout) * _per_channel(weight, 1.0, x, layout) \
        + _per_channel(bias, 0.0, x, layout)
    return _store(out, y, x.dtype), mean[..., 0], invstd[..., 0]


def group_norm_backward(dy, x, num_groups, mean, invstd, weight=None, *, layout="NCHW", out=None):
    """Reference group-norm gradients ``(dx, dweight, dbias)``, dweight/dbias float64 (C,)."""
    stat = np.asarray(invstd, np.float64)[..., None]
    x_hat = (_grouped(x, num_groups, layout) - np.asarray(mean, np.float64)[..., None]) * stat
    dy64 = np.asarray(dy, np.float64)
    g = _grouped(dy64 * _per_channel(weight, 1.0, x, layout), num_groups, layout)
    dx = _ungrouped(_backward(g, x_hat, stat, (2,)), x.shape, layout)
    axis = _checks.channel_axis(x.ndim, layout)
    others = tuple(a for a in range(x.ndim) if a != axis)
    dweight = (dy64 * _ungrouped(x_hat, x.shape, layout)).sum(axis=others)
    return _store(out, dx, x.dtype), dweight, dy64.sum(axis=others)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout="NCHW"):
    """Reference group norm; returns ``y``."""
    return group_norm_forward(x, num_groups, weight, bias, eps, layout=layout)[0]


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, *, layout="NCHW"):
    """Reference instance norm (PyTorch's semantics, running statistics averaged over N); returns ``y``."""
    _checks.check_input(x, "x", FLOAT_DTYPES)
    num_n = x.shape[0]
    num_channels = x.shape[_checks.channel_axis(x.ndim, layout)]
    if not use_input_stats:
        mean = np.tile(np.asarray(running_mean, np.float64), (num_n, 1))
        invstd = 1.0 / np.sqrt(np.tile(np.asarray(running_var, np.float64), (num_n, 1)) + eps)
        x_hat = (_grouped(x, num_channels, layout) - mean[..., None]) * invstd[..., None]
    else:
        x_hat, mean, invstd = _normalize(_grouped(x, num_channels, layout), (2,), eps)
        if running_mean is not None:
            n = x.size // (num_n * num_channels)
            centered = _grouped(x, num_channels, layout) - mean
            var = (centered * centered).mean(axis=2)
            running_mean[...] = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean[..., 0].mean(0)
            running_var[...] = ((1 - momentum) * running_var.astype(np.float64)
                                + momentum * (var * (n / (n - 1))).mean(0))
    y = _ungrouped(x_hat, x.shape, layout) * _per_channel(weight, 1.0, x, layout) \
        + _per_channel(bias, 0.0, x, layout)
    return y.astype(x.dtype)


def _store(out, value, dtype):
    if out is None:
        return value.astype(dtype)
    out[...] = value
    return out

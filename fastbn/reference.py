"""NumPy reference implementation: the float64 truth every kernel is validated against.

Plain, readable NumPy.  Every computation happens in float64 with a two-pass variance
(mean first, then the mean of squared deviations), whatever the input dtype; ``y`` and
``dx`` are returned in the input's dtype, statistics in float64.  The signatures and the
argument checks are those of :mod:`fastbn`; the reference additionally accepts float16
inputs (to validate the CUDA float16 path) and parameters of any float dtype.
"""

import numpy as np

from . import _checks, _epilogue
from .stats import Moments

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _reduce_axes(ndim, layout):
    axis = _checks.channel_axis(ndim, layout)
    return tuple(a for a in range(ndim) if a != axis)


def _per_channel(v, ndim, layout):
    """Reshape a (C,) vector so it broadcasts along the channel axis."""
    shape = [1] * ndim
    shape[_checks.channel_axis(ndim, layout)] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def _stats64(x64, layout):
    axes = _reduce_axes(x64.ndim, layout)
    if x64.size == 0:  # an empty batch has no statistics (fastbn's documented NaN)
        nan = np.full(x64.shape[_checks.channel_axis(x64.ndim, layout)], np.nan)
        return nan, nan.copy()
    mean = x64.mean(axis=axes)
    centered = x64 - _per_channel(mean, x64.ndim, layout)
    var = (centered * centered).mean(axis=axes)
    return mean, var


def _store(out, value, dtype):
    if out is None:
        return value.astype(dtype)
    out[...] = value
    return out


def moments(x, *, layout="NCHW"):
    """Per-channel :class:`fastbn.Moments` ``(count, mean, M2)`` of ``x``, two-pass, float64 (C,)."""
    _checks.check_layout(layout)
    _checks.check_input(x, "x", FLOAT_DTYPES)
    x64 = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x64.ndim, layout)
    mean = x64.mean(axis=axes)
    centered = x64 - _per_channel(mean, x64.ndim, layout)
    count = np.full(mean.shape, float(_checks.values_per_channel(x.shape, layout)))
    return Moments(count, mean, (centered * centered).sum(axis=axes))


def batch_stats(x, *, layout="NCHW"):
    """Per-channel mean and population (biased) variance of ``x``.

    x: float array of rank 2-5 in ``layout``.  Returns ``(mean, var)``, float64, shape (C,).
    """
    _checks.check_layout(layout)
    _checks.check_input(x, "x", FLOAT_DTYPES, allow_empty=True)
    return _stats64(np.asarray(x, dtype=np.float64), layout)


def batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, layout="NCHW", out=None,
                       activation=None, residual=None, virtual_batch_size=None):
    """Reference batch-norm forward; see :func:`fastbn.batch_norm_forward`.

    ``activation`` (None or "relu") and ``residual`` are the unfused ops in float64:
    ``relu(bn(x) + residual)``.

    Same argument order as :func:`fastbn.batch_norm_forward`: ``x, weight, bias``
    positional (ATen ``native_batch_norm``'s order), running statistics and everything
    after them keyword-only, so ``torch.nn.functional.batch_norm``'s order with weight or
    bias raises TypeError.

    Returns ``(y, save_mean, save_invstd)``: ``y`` like ``x``; the statistics float64 (C,).
    Running statistics, when given and ``training``, are updated in place.
    With ``virtual_batch_size`` in training, see :func:`_virtual_forward`.
    """
    if virtual_batch_size is not None and training:
        return _virtual_forward(x, weight, bias, running_mean, running_var, momentum, eps, layout,
                                virtual_batch_size)
    _checks.check_forward_args(x, weight, bias, running_mean, running_var, training, momentum, eps,
                               layout, FLOAT_DTYPES, FLOAT_DTYPES, allow_empty=True)
    _checks.check_out(out, "out", x.shape, x.dtype)
    _epilogue.check_activation(activation)
    _epilogue.check_like_x(residual, "residual", x, FLOAT_DTYPES)
    x64 = np.asarray(x, dtype=np.float64)
    if training:
        mean, var = _stats64(x64, layout)
        if running_mean is not None and x64.size:  # an empty batch updates nothing
            n = _checks.values_per_channel(x.shape, layout)
            running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
            running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * var * (n / (n - 1))
    else:
        mean = running_mean.astype(np.float64)
        var = running_var.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.astype(np.float64)
    shift = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
    y = (x64 - _per_channel(mean, x.ndim, layout)) * _per_channel(scale, x.ndim, layout) \
        + _per_channel(shift, x.ndim, layout)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return _store(out, y, x.dtype), mean.copy(), invstd


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *,
                        training=True, layout="NCHW", out=None, activation=None, y=None, residual=False,
                        virtual_batch_size=None):
    """Reference batch-norm backward; see :func:`fastbn.batch_norm_backward`.

    Returns ``(dx, dweight, dbias)``: ``dx`` like ``x``; ``dweight``/``dbias`` float64 (C,);
    with ``residual=True`` also ``dresidual`` (x's dtype).  With ``activation="relu"``
    ``dy`` is first masked by the forward's output: ``g = 0 where y <= 0 else dy``.
    With ``virtual_batch_size`` in training, see :func:`_virtual_backward`.
    """
    if virtual_batch_size is not None and training:
        return _virtual_backward(dy, x, save_mean, save_invstd, weight, layout, virtual_batch_size)
    _checks.check_backward_args(dy, x, save_mean, save_invstd, weight, training, layout,
                                FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES, allow_empty=True)
    _checks.check_out(out, "out", x.shape, x.dtype)
    _epilogue.check_backward_epilogue(activation, y, residual, x, FLOAT_DTYPES)
    ndim = x.ndim
    axes = _reduce_axes(ndim, layout)
    x64 = np.asarray(x, dtype=np.float64)
    dy64 = np.asarray(dy, dtype=np.float64)
    if activation == "relu":
        dy64 = np.where(np.asarray(y) <= 0, 0.0, dy64)
    dresidual = dy64.astype(x.dtype)
    invstd = save_invstd.astype(np.float64)
    w = np.ones_like(invstd) if weight is None else weight.astype(np.float64)
    x_hat = (x64 - _per_channel(save_mean, ndim, layout)) * _per_channel(invstd, ndim, layout)
    dbias = dy64.sum(axis=axes)
    dweight = (dy64 * x_hat).sum(axis=axes)
    if training and x64.size:  # with no values, no path through the batch statistics
        n = _checks.values_per_channel(x.shape, layout)
        dx = _per_channel(w * invstd, ndim, layout) * (
            dy64 - _per_channel(dbias / n, ndim, layout) - x_hat * _per_channel(dweight / n, ndim, layout)
        )
    else:
        dx = dy64 * _per_channel(w * invstd, ndim, layout)
    grads = (_store(out, dx, x.dtype), dweight, dbias)
    return (*grads, dresidual) if residual else grads


def _slices(num_samples, k):
    return [slice(lo, min(lo + k, num_samples)) for lo in range(0, num_samples, k)]


def _virtual_forward(x, weight, bias, running_mean, running_var, momentum, eps, layout, k):
    """Ghost batches, a loop over the slices of ``k`` samples: each slice a plain training
    forward; statistics float64 (slices, C); the running statistics the average over the
    slices of each slice's update (so of the slices' means and unbiased variances)."""
    ys, means, invstds, runs = [], [], [], []
    for part in _slices(x.shape[0], k):
        run = None if running_mean is None else [running_mean.astype(np.float64), running_var.astype(np.float64)]
        y, mean, invstd = batch_norm_forward(x[part], weight, bias, running_mean=run and run[0],
                                             running_var=run and run[1], momentum=momentum, eps=eps, layout=layout)
        ys.append(y)
        means.append(mean)
        invstds.append(invstd)
        runs.append(run)
    if running_mean is not None:
        running_mean[...] = np.mean([r[0] for r in runs], axis=0)
        running_var[...] = np.mean([r[1] for r in runs], axis=0)
    return np.concatenate(ys), np.array(means), np.array(invstds)


def _virtual_backward(dy, x, save_mean, save_invstd, weight, layout, k):
    """Ghost batches: each slice's plain training backward with its own (C,) statistics;
    dweight and dbias summed over the slices."""
    grads = [batch_norm_backward(dy[part], x[part], save_mean[i], save_invstd[i], weight, layout=layout)
             for i, part in enumerate(_slices(x.shape[0], k))]
    return (np.concatenate([g[0] for g in grads]), np.sum([g[1] for g in grads], axis=0),
            np.sum([g[2] for g in grads], axis=0))


# Layer, group and instance norm live in reference_norms (this file's size); same names here.
from . import reference_norms as _norms  # noqa: E402

layer_norm_forward, layer_norm_backward, layer_norm = (
    _norms.layer_norm_forward, _norms.layer_norm_backward, _norms.layer_norm)
group_norm_forward, group_norm_backward, group_norm = (
    _norms.group_norm_forward, _norms.group_norm_backward, _norms.group_norm)
instance_norm = _norms.instance_norm

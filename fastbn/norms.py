"""Layer, group and instance normalization: argument checks, then the CPU pipeline of
:mod:`fastbn.cpu.norms` (the batch-norm statistics and apply kernels over other kept axes).

Argument order is PyTorch's functional one; ``*_forward`` returns what ``*_backward``
takes.  The contract of :mod:`fastbn._api` holds (errors name the argument and are raised
before anything is written; inputs are never written; float32 data accumulates in
float64 and statistics are float64).  Shapes: group and instance norm take ``x`` of rank
2-5 with C channels on axis 1 (``layout="NCHW"``) or last (``"NHWC"``), the latter run
without a transpose copy; layer norm takes ``x`` of rank 2-5 and normalizes over its
trailing ``normalized_shape``.

Where the data lives picks the backend, as for batch norm (:func:`fastbn._dispatch.select_backend`):
NumPy arrays run :mod:`fastbn.cpu.norms`, CUDA device arrays :mod:`fastbn.cuda.norms`
(imported on the first device array), with results of the caller's kind.
"""

import math
import numbers

import numpy as np

from . import _checks
from ._api import _param_dtype, batch_norm_forward
from ._dispatch import select_backend
from .cpu import norms as _cpu


def _select(arrays):
    """``(backend, module)``: the :class:`~fastbn._dispatch.Backend` of the arrays and its norms module."""
    backend = select_backend(arrays)
    if backend.name == "cpu":
        return backend, _cpu
    from .cuda import norms as _cuda  # lazy: only processes that pass device arrays import numba.cuda
    return backend, _cuda


def _normalized_shape(normalized_shape, x):
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    if isinstance(normalized_shape, (str, bytes)) or not hasattr(normalized_shape, "__iter__") or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in normalized_shape):
        raise TypeError(f"normalized_shape: expected an int or a tuple of ints, got {normalized_shape!r}")
    shape = tuple(int(s) for s in normalized_shape)
    if not 1 <= len(shape) <= len(x.shape) or tuple(x.shape[len(x.shape) - len(shape):]) != shape:
        raise ValueError(f"normalized_shape: expected the trailing dimensions of x {tuple(x.shape)} "
                         f"(at least one), got {shape}")
    return shape


def _check_affine(v, name, shape, dtype):
    if v is None:
        return
    if not hasattr(v, "shape") or not hasattr(v, "dtype"):
        raise TypeError(f"{name}: expected an array of shape {shape}, got {type(v).__name__}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(v.shape)}")
    if _checks.dtype_of(v) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {_checks.dtype_name(v)}")
    _checks.reject_masked(v, name)


def _check_pair(dy, x, backend):
    _checks.check_gradient_pair(dy, x, backend.storage_dtypes)


def _check_statistics(values, shape, backend):
    for name, v in values.items():
        if v is None:
            raise ValueError(f"{name}: expected an array of shape {tuple(shape)}, got None")
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            raise TypeError(f"{name}: expected an array of shape {tuple(shape)}, got {type(v).__name__}")
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)} (from the forward pass), got {tuple(v.shape)}")
        if _checks.dtype_of(v) not in backend.statistics_dtypes:
            expected = " or ".join(str(d) for d in backend.statistics_dtypes)
            raise TypeError(f"{name}: expected dtype {expected}, got {_checks.dtype_name(v)}")


# --------------------------------------------------------------------------- layer norm

def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Layer norm over the trailing ``normalized_shape`` axes of ``x``; returns ``(y, mean, invstd)``.

    x : float32 or float64 array of rank 2-5 (any strides).
    normalized_shape : int or tuple of ints, equal to ``x.shape[-len(normalized_shape):]``.
    weight, bias : arrays of shape ``normalized_shape`` in x's dtype, or None.
    eps : real > 0.  out : optional writable array like ``x`` (may be ``x``).

    Returns ``y`` like ``x``, and ``mean`` and ``invstd = 1 / sqrt(var + eps)`` (biased
    var), float64 of shape ``x.shape[:-len(normalized_shape)]``.
    """
    backend, module = _select({"x": x, "weight": weight, "bias": bias, "out": out})
    _checks.check_input(x, "x", backend.storage_dtypes)
    shape = _normalized_shape(normalized_shape, x)
    _check_affine(weight, "weight", shape, _param_dtype(x))
    _check_affine(bias, "bias", shape, _param_dtype(x))
    eps = _checks.check_scalar(eps, "eps", 0.0, np.inf, low_open=True)
    _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
    return module.layer_forward(x, len(shape), weight, bias, eps, out, _checks.dtype_of(x))


def layer_norm_backward(dy, x, normalized_shape, mean, invstd, weight=None, *, out=None):
    """Layer-norm gradients; returns ``(dx, dweight, dbias)``.

    dy, x : arrays of one shape and dtype (see :func:`layer_norm_forward`).
    mean, invstd : float64 of shape ``x.shape[:-len(normalized_shape)]``, from the forward.
    weight : array of shape ``normalized_shape`` or None.  out : optional array like x.

    ``dx`` like ``x``; ``dweight = sum(dy * x_hat)`` and ``dbias = sum(dy)`` over the
    leading axes, shaped ``normalized_shape`` in x's dtype (returned even without weight).
    """
    backend, module = _select({"dy": dy, "x": x, "mean": mean, "invstd": invstd, "weight": weight, "out": out})
    _check_pair(dy, x, backend)
    shape = _normalized_shape(normalized_shape, x)
    _check_statistics({"mean": mean, "invstd": invstd}, x.shape[:x.ndim - len(shape)], backend)
    _check_affine(weight, "weight", shape, _param_dtype(x))
    _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
    return module.layer_backward(dy, x, len(shape), mean, invstd, weight, out, _checks.dtype_of(x))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm in ``torch.nn.functional.layer_norm``'s argument order; returns ``y``
    (see :func:`layer_norm_forward`)."""
    return layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]


# --------------------------------------------------------------------------- group norm

def _num_channels(x, layout):
    return x.shape[_checks.channel_axis(len(x.shape), layout)]


def _check_groups(num_groups, num_channels):
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {type(num_groups).__name__}")
    if num_groups < 1 or num_channels % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the number of channels {num_channels}, "
                         f"got {num_groups}")
    return int(num_groups)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout="NCHW", out=None):
    """Group norm: each sample's channels split into ``num_groups`` groups of C / G
    channels, normalized over the group's channels and spatial positions; returns
    ``(y, mean, invstd)``.

    x : float32 or float64 array of rank 2-5 in ``layout``.  num_groups : int dividing C.
    weight, bias : (C,) arrays in x's dtype, or None.  eps : real > 0.
    out : optional writable array like ``x`` (may be ``x``).

    Returns ``y`` like ``x``, and ``mean``, ``invstd`` float64 (N, G).
    """
    backend, module = _select({"x": x, "weight": weight, "bias": bias, "out": out})
    _checks.check_layout(layout)
    _checks.check_input(x, "x", backend.storage_dtypes)
    num_channels = _num_channels(x, layout)
    num_groups = _check_groups(num_groups, num_channels)
    _checks.check_channel_vector(weight, "weight", num_channels, _param_dtype(x))
    _checks.check_channel_vector(bias, "bias", num_channels, _param_dtype(x))
    eps = _checks.check_scalar(eps, "eps", 0.0, np.inf, low_open=True)
    _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
    return module.group_forward(x, num_groups, weight, bias, eps, None, None, 0.0, layout, out, _checks.dtype_of(x))


def group_norm_backward(dy, x, num_groups, mean, invstd, weight=None, *, layout="NCHW", out=None):
    """Group-norm gradients; returns ``(dx, dweight, dbias)``.

    dy, x : arrays of one shape and dtype in ``layout``; mean, invstd : float64 (N, G)
    from :func:`group_norm_forward`; weight : (C,) or None; out : optional array like x.
    ``dweight``, ``dbias`` are (C,) in x's dtype.
    """
    backend, module = _select({"dy": dy, "x": x, "mean": mean, "invstd": invstd, "weight": weight, "out": out})
    _checks.check_layout(layout)
    _check_pair(dy, x, backend)
    num_channels = _num_channels(x, layout)
    num_groups = _check_groups(num_groups, num_channels)
    _check_statistics({"mean": mean, "invstd": invstd}, (x.shape[0], num_groups), backend)
    _checks.check_channel_vector(weight, "weight", num_channels, _param_dtype(x))
    _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
    return module.group_backward(dy, x, num_groups, mean, invstd, weight, layout, out, _checks.dtype_of(x))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout="NCHW"):
    """Group norm in ``torch.nn.functional.group_norm``'s argument order; returns ``y``
    (see :func:`group_norm_forward`)."""
    return group_norm_forward(x, num_groups, weight, bias, eps, layout=layout)[0]


# --------------------------------------------------------------------------- instance norm

def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, *, layout="NCHW"):
    """Instance norm (group norm with one channel per group) in
    ``torch.nn.functional.instance_norm``'s argument order; returns ``y``.

    x : float32 or float64 array of rank 3-5 in ``layout`` (a spatial axis is needed).
    running_mean, running_var : (C,) arrays in x's dtype, or None (both or neither).
        With ``use_input_stats`` they are updated in place as PyTorch does: each sample's
        statistics (unbiased variance) folded in with ``momentum``, averaged over N.
        Without ``use_input_stats`` they are required and normalized with (read only).
    weight, bias : (C,) arrays in x's dtype, or None.  eps : real > 0.
    """
    if not isinstance(use_input_stats, (bool, np.bool_)):
        raise TypeError(f"use_input_stats: expected a bool, got {type(use_input_stats).__name__}")
    if not use_input_stats:
        _check_instance_input(x, {"x": x, "running_mean": running_mean, "running_var": running_var})
        return batch_norm_forward(x, weight, bias, running_mean=running_mean, running_var=running_var,
                                  training=False, momentum=momentum, eps=eps, layout=layout)[0]
    return instance_norm_forward(x, running_mean, running_var, weight, bias, momentum, eps, layout=layout)[0]


def _check_instance_input(x, arrays):
    backend, module = _select(arrays)
    _checks.check_input(x, "x", backend.storage_dtypes)
    if len(x.shape) < 3:
        raise ValueError(f"x: expected an array of rank 3 to 5 (instance norm needs a spatial axis), "
                         f"got shape {tuple(x.shape)}")
    return module


def instance_norm_forward(x, running_mean=None, running_var=None, weight=None, bias=None, momentum=0.1,
                          eps=1e-5, *, layout="NCHW"):
    """Instance norm with the input's statistics (see :func:`instance_norm`); returns
    ``(y, mean, invstd)``, the statistics float64 (N, C): what
    :func:`group_norm_backward` with ``num_groups = C`` takes."""
    module = _check_instance_input(x, {"x": x, "running_mean": running_mean, "running_var": running_var,
                                       "weight": weight, "bias": bias})
    _checks.check_layout(layout)
    num_channels = _num_channels(x, layout)
    _checks.check_channel_vector(weight, "weight", num_channels, _param_dtype(x))
    _checks.check_channel_vector(bias, "bias", num_channels, _param_dtype(x))
    eps = _checks.check_scalar(eps, "eps", 0.0, np.inf, low_open=True)
    momentum = _checks.check_scalar(momentum, "momentum", 0.0, 1.0, low_open=False)
    _checks.check_running_stats(running_mean, running_var, num_channels, _param_dtype(x), True)
    if running_mean is not None and math.prod(x.shape) // (x.shape[0] * num_channels) < 2:
        raise ValueError(f"x: expected more than 1 spatial element per channel when updating running "
                         f"statistics, got shape {tuple(x.shape)}")
    return module.group_forward(x, num_channels, weight, bias, eps, running_mean, running_var, momentum, layout,
                                None, _checks.dtype_of(x))

"""The public stages of batch normalization, the pieces :func:`fastbn.batch_norm_forward`
and :func:`fastbn.batch_norm_backward` are built from::

    forward:   moments -> (merge) -> forward_coefficients -> apply
    backward:  backward_sums -> (merge) -> backward_coefficients -> backward_apply
               backward_sums -> parameter_gradients

A stage takes and returns arrays where the data lives (NumPy, or CUDA device arrays) and
checks its arguments like the public functions do.  Between stages the values can leave
the process: :class:`~fastbn.stats.Moments` and :class:`~fastbn.stats.BackwardSums`
merge with those of other chunks or other machines, and every count the coefficients
use (n / (n - 1) for the running variance, the 1 / n of the backward means) comes from
the merged values, not from a local array.  Synchronized batch norm is::

    m = stages.moments(x_local).merge(*other_ranks_moments)          # rank order
    c = stages.forward_coefficients(m, weight, bias, dtype=x_local.dtype,
                                    running_mean=rm, running_var=rv)
    y = stages.apply(x_local, c)

Layouts and shapes are those of :func:`fastbn.batch_norm_forward`: ``x`` of rank 2-5 with
C channels on axis 1 (``layout="NCHW"``) or last (``"NHWC"``); every per-channel vector
has shape (C,).  dtypes follow :mod:`fastbn.dtypes`.
"""

import numpy as np

from . import _checks, _epilogue
from ._dispatch import select_backend
from .coefficients import BackwardCoefficients, ForwardCoefficients
from .dtypes import POLICIES
from .stats import BackwardSums, Moments

__all__ = ["moments", "forward_coefficients", "apply", "backward_sums", "backward_coefficients",
           "parameter_gradients", "backward_apply", "Moments", "BackwardSums", "ForwardCoefficients",
           "BackwardCoefficients"]


def _storage_dtype(dtype, backend):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected a NumPy float dtype, got {dtype!r}") from None
    if dtype not in backend.storage_dtypes:
        allowed = " or ".join(str(d) for d in backend.storage_dtypes)
        raise TypeError(f"dtype: expected {allowed} (the dtype of the x normalized), got {dtype}")
    return POLICIES[dtype.name]


def _host_counts_above(count, name, minimum, reason):
    if isinstance(count, np.ndarray) and not np.all(count > minimum):
        raise ValueError(f"{name}.count: expected more than {minimum} value(s) per channel ({reason}), "
                         f"got {count.min():g}")


def moments(x, *, layout="NCHW"):
    """Per-channel :class:`Moments` ``(count, mean, M2)`` of ``x``, float64 (C,), in one pass.

    x : float32 or float64 array of rank 2-5 in ``layout`` (float16 too on CUDA); any strides.
    """
    backend = select_backend({"x": x})
    _checks.check_layout(layout)
    _checks.check_input(x, "x", backend.storage_dtypes)
    b = backend.module
    return b.moments(x, b.geometry(x, layout))


def forward_coefficients(stats, weight=None, bias=None, *, dtype, eps=1e-5, running_mean=None,
                         running_var=None, momentum=0.1):
    """Per-channel :class:`ForwardCoefficients` of ``y = (x - center) * scale + shift``.

    Parameters
    ----------
    stats : :class:`Moments` (batch statistics, e.g. merged over chunks or ranks; each
        count > 0), or a ``(mean, var)`` pair of (C,) arrays to normalize with as they
        are (e.g. running statistics; var biased).
    weight, bias : (C,) arrays in the parameter dtype of ``dtype``, or None.
    dtype : the dtype of the ``x`` these coefficients will be applied to.
    eps : real > 0, added to the variance.
    running_mean, running_var : (C,) arrays in the parameter dtype, updated in place
        with the unbiased variance ``var * count / (count - 1)`` of ``stats``' own count
        (so every count must be > 1); only with :class:`Moments`.
    momentum : real in [0, 1], the update's weight of the batch statistics.

    Returns
    -------
    ForwardCoefficients: center, scale, shift in the compute dtype; mean and invstd in
    the statistics dtype (what :func:`fastbn.batch_norm_backward` takes as
    ``save_mean``/``save_invstd``).
    """
    from_moments = isinstance(stats, Moments)
    if from_moments:
        fields = stats
    elif isinstance(stats, (tuple, list)) and len(stats) == 2:
        fields = tuple(stats)
    else:
        raise TypeError(f"stats: expected Moments or a (mean, var) pair, got {type(stats).__name__}")
    names = ("stats.count", "stats.mean", "stats.m2") if from_moments else ("stats[0]", "stats[1]")
    backend = select_backend({**dict(zip(names, fields)), "weight": weight, "bias": bias,
                              "running_mean": running_mean, "running_var": running_var})
    policy = _storage_dtype(dtype, backend)
    if not hasattr(fields[-1], "shape") or len(fields[-1].shape) != 1:
        raise ValueError(f"{names[-1]}: expected a (C,) array, got {getattr(fields[-1], 'shape', fields[-1])!r}")
    num_channels = fields[-1].shape[0]
    accepted = (policy.parameters, policy.statistics, np.dtype(np.float64))
    for name, value in zip(names, fields):
        _checks.check_channel_vector(value, name, num_channels, accepted)
    eps = _checks.check_scalar(eps, "eps", 0.0, np.inf, low_open=True)
    momentum = _checks.check_scalar(momentum, "momentum", 0.0, 1.0, low_open=False)
    _checks.check_channel_vector(weight, "weight", num_channels, policy.parameters)
    _checks.check_channel_vector(bias, "bias", num_channels, policy.parameters)
    update = running_mean is not None or running_var is not None
    if update:
        if not from_moments:
            raise ValueError("running_mean, running_var: expected None with a (mean, var) pair "
                             "(running statistics are updated from Moments), got arrays")
        _checks.check_running_stats(running_mean, running_var, num_channels, policy.parameters, True)
        _host_counts_above(stats.count, "stats", 1, "the running variance is unbiased by n / (n - 1)")
    elif from_moments:
        _host_counts_above(stats.count, "stats", 0, "an empty channel has no variance")
    b = backend.module
    if from_moments:
        return b.forward_coefficients(stats.count, stats.mean, stats.m2, True, weight, bias, eps,
                                      running_mean, running_var, momentum, update, policy.storage)
    return b.forward_coefficients(None, fields[0], fields[1], False, weight, bias, eps,
                                  None, None, 0.0, False, policy.storage)


def apply(x, coefficients, *, layout="NCHW", out=None, activation=None, residual=None):
    """``y = activation((x - center) * scale + shift + residual)`` per channel, one pass;
    returns ``y`` (``out``).

    x : array of rank 2-5 in ``layout``; coefficients : :class:`ForwardCoefficients` for
    x's dtype (:func:`forward_coefficients`); out : optional array like ``x`` (may be ``x``);
    activation : None or "relu"; residual : None or an array like ``x`` (may be ``x``),
    added before the activation (see :func:`fastbn.batch_norm_forward`).
    """
    c = coefficients
    backend = select_backend({"x": x, "coefficients.center": getattr(c, "center", None), "out": out,
                              "residual": residual})
    _checks.check_layout(layout)
    _checks.check_input(x, "x", backend.storage_dtypes)
    _check_vectors(c, ForwardCoefficients, ("center", "scale", "shift"), x, layout)
    _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
    _epilogue.check_activation(activation)
    _epilogue.check_like_x(residual, "residual", x, backend.storage_dtypes)
    b = backend.module
    if activation is None and residual is None:
        return b.apply(x, c, b.geometry(x, layout), out)
    return b.apply(x, c, b.geometry(x, layout), out, residual=residual, activation=activation)


def _check_vectors(c, kind, fields, x, layout):
    if not isinstance(c, kind):
        raise TypeError(f"coefficients: expected {kind.__name__}, got {type(c).__name__}")
    num_channels = x.shape[_checks.channel_axis(len(x.shape), layout)]
    compute = POLICIES[_checks.dtype_of(x).name].compute
    for field in fields:
        _checks.check_channel_vector(getattr(c, field), f"coefficients.{field}", num_channels, compute)


def _check_pair(dy, x, layout, backend):
    _checks.check_layout(layout)
    _checks.check_gradient_pair(dy, x, backend.storage_dtypes)
    return x.shape[_checks.channel_axis(len(x.shape), layout)]


def backward_sums(dy, x, mean, *, layout="NCHW", y=None):
    """Per-channel :class:`BackwardSums`: ``count``, ``sum(dy)``, ``sum(dy * (x - mean))``, float64 (C,).

    dy, x : arrays of one shape and dtype in ``layout``; mean : (C,) the forward's mean;
    y : None, or the output of a forward with ``activation="relu"``: ``dy`` is then read
    as ``0 where y <= 0 else dy`` (the ReLU mask; NumPy arrays only).
    """
    backend = select_backend({"dy": dy, "x": x, "mean": mean, "y": y})
    num_channels = _check_pair(dy, x, layout, backend)
    _checks.check_channel_vector(mean, "mean", num_channels, backend.statistics_dtypes)
    _epilogue.check_like_x(y, "y", x, backend.storage_dtypes)
    b = backend.module
    if y is None:
        return b.backward_sums(dy, x, mean, b.geometry(x, layout))
    _epilogue.refuse_device(backend)
    return b.backward_sums(dy, x, mean, b.geometry(x, layout), y=y)


def _check_sums(sums, num_channels):
    if not isinstance(sums, BackwardSums):
        raise TypeError(f"sums: expected BackwardSums, got {type(sums).__name__}")
    for field in sums._fields:
        _checks.check_channel_vector(getattr(sums, field), f"sums.{field}", num_channels, np.dtype(np.float64))


def backward_coefficients(sums, mean, invstd, weight=None, *, dtype, training=True):
    """Per-channel :class:`BackwardCoefficients` of
    ``dx = dy * dy_scale + (x - center) * x_scale + shift``.

    sums : :class:`BackwardSums` (merged over every part of the batch: its count is the
        batch's; each count > 0 when training); mean, invstd : (C,) the forward's saved
        statistics; weight : (C,) or None; dtype : the dtype of x and dy; training :
        differentiate through the batch statistics (True) or hold them constant.
    """
    backend = select_backend({"sums.count": getattr(sums, "count", None), "mean": mean,
                              "invstd": invstd, "weight": weight})
    policy = _storage_dtype(dtype, backend)
    num_channels = getattr(invstd, "shape", (None,))[0]
    _checks.check_channel_vector(invstd, "invstd", num_channels, backend.statistics_dtypes)
    _checks.check_channel_vector(mean, "mean", num_channels, backend.statistics_dtypes)
    _checks.check_channel_vector(weight, "weight", num_channels, policy.parameters)
    _check_sums(sums, num_channels)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if training:
        _host_counts_above(sums.count, "sums", 0, "the backward means divide by it")
    return backend.module.backward_coefficients(sums, mean, invstd, weight, bool(training), policy.storage)


def parameter_gradients(sums, invstd, *, dtype):
    """``(dweight, dbias)``: ``invstd * sum(dy * (x - mean))`` and ``sum(dy)`` of ``sums``,
    (C,) in the parameter dtype of ``dtype`` (pass this process's own sums to get its
    contribution, as data-parallel training expects)."""
    backend = select_backend({"sums.count": getattr(sums, "count", None), "invstd": invstd})
    policy = _storage_dtype(dtype, backend)
    num_channels = getattr(invstd, "shape", (None,))[0]
    _checks.check_channel_vector(invstd, "invstd", num_channels, backend.statistics_dtypes)
    _check_sums(sums, num_channels)
    return backend.module.parameter_gradients(sums, invstd, policy.storage)


def backward_apply(dy, x, coefficients, *, layout="NCHW", out=None, y=None):
    """``dx = dy * dy_scale + (x - center) * x_scale + shift`` per channel, one pass; returns
    ``dx`` (``out`` when given; it may be ``dy`` or ``x``).  With ``y`` (the output of a
    forward with ``activation="relu"``), ``dy`` is masked as in :func:`backward_sums`."""
    c = coefficients
    backend = select_backend({"dy": dy, "x": x, "coefficients.center": getattr(c, "center", None),
                              "out": out, "y": y})
    _check_pair(dy, x, layout, backend)
    _check_vectors(c, BackwardCoefficients, BackwardCoefficients._fields, x, layout)
    _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
    _epilogue.check_like_x(y, "y", x, backend.storage_dtypes)
    b = backend.module
    if y is None:
        return b.backward_apply(dy, x, c, b.geometry(x, layout), out)
    _epilogue.refuse_device(backend)
    return b.backward_apply(dy, x, c, b.geometry(x, layout), out, y=y)

"""Virtual ("ghost") batches: training batch norm with statistics per slice of ``k``
samples along N, reached through ``virtual_batch_size=k`` on
:func:`fastbn.batch_norm_forward` and :func:`fastbn.batch_norm_backward`.

Rules (also in those docstrings and the README):

- Slices are samples ``[0, k), [k, 2k), ...``; the last one has ``N - k * (slices - 1)``
  samples when k does not divide N (Keras's ``virtual_batch_size`` requires N divisible
  by k).  Every slice is normalized with its own biased mean and variance, computed for
  all slices in one pass over ``x``; ``save_mean``/``save_invstd`` are float64
  ``(slices, C)``, what the backward takes back as they came.
- Running statistics: ``r = (1 - momentum) * r + momentum * average over slices``, the
  average of the slices' means and of their unbiased variances (each slice unbiased with
  its own count), every slice weighing the same.  Keras averages the slices' (biased)
  variances for its moving variance, all slices being of one size.
- Training only: with ``training=False`` virtual_batch_size has no effect (the running
  statistics normalize, as usual).  One slice (k >= N) is plain batch norm: that path
  runs, so results are bitwise those of ``virtual_batch_size=None`` (statistics shaped
  (1, C)).
- Every slice needs more than one value per channel (``Expected more than 1 value per
  channel when training``), e.g. k = 1 without spatial axes is refused.
- Not combined with ``activation``/``residual`` (ValueError); CUDA device arrays are a
  TypeError (virtual batches run on the CPU).
"""

import numbers

import numpy as np

from . import _checks
from ._api import _param_dtype, batch_norm_backward, batch_norm_forward
from ._dispatch import select_backend
from .cpu import ghost as _cpu
from .norms import _check_statistics


def check_virtual_batch_size(k):
    """``k`` as an int, or TypeError/ValueError naming ``virtual_batch_size``."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"virtual_batch_size: expected None or a positive int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"virtual_batch_size: expected None or a positive int, got {k}")
    return int(k)


def num_slices(num_samples, k):
    """Slices of at most ``k`` samples covering ``num_samples``."""
    return -(-num_samples // k)


def _host_only(arrays, epilogue):
    backend = select_backend(arrays)
    if backend.name != "cpu":
        raise TypeError("virtual_batch_size: expected NumPy arrays (virtual batches run on the CPU), "
                        "got CUDA device arrays")
    if epilogue:
        raise ValueError("virtual_batch_size: expected no activation, residual or y with virtual batches "
                         "(the fused epilogues run on whole batches only), got some")
    return backend


def _check_slice_sizes(shape, layout, k):
    """Every slice needs more than one value per channel, as a whole batch does."""
    smallest = min(k, shape[0] - k * (num_slices(shape[0], k) - 1))
    per_sample = _checks.values_per_channel(shape, layout) // shape[0]
    if smallest * per_sample < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got a virtual batch of "
                         f"{smallest} sample(s) of input size {tuple(shape)} (virtual_batch_size={k})")


def forward(x, weight, bias, running_mean, running_var, momentum, eps, layout, out, activation, residual, k):
    """:func:`fastbn.batch_norm_forward` in training with ``virtual_batch_size=k``
    (see the module docstring); returns ``(y, save_mean, save_invstd)``, statistics
    float64 (slices, C)."""
    backend = _host_only({"x": x, "weight": weight, "bias": bias, "running_mean": running_mean,
                          "running_var": running_var, "out": out, "residual": residual},
                         activation is not None or residual is not None)
    num_channels = _checks.check_forward_args(x, weight, bias, running_mean, running_var, True, momentum, eps,
                                              layout, backend.storage_dtypes, _param_dtype(x), True)
    dtype = _checks.dtype_of(x)
    _checks.check_out(out, "out", x.shape, dtype)
    slices = num_slices(x.shape[0], k)
    if _checks.is_empty(x.shape):  # no values: NaN statistics, nothing updated (as the plain call)
        y = np.empty(x.shape, dtype) if out is None else out
        return y, np.full((slices, num_channels), np.nan), np.full((slices, num_channels), np.nan)
    _check_slice_sizes(x.shape, layout, k)
    if slices == 1:
        y, save_mean, save_invstd = batch_norm_forward(
            x, weight, bias, running_mean=running_mean, running_var=running_var, training=True,
            momentum=momentum, eps=eps, layout=layout, out=out)
        return y, save_mean.reshape(1, -1), save_invstd.reshape(1, -1)
    geometry = backend.module.geometry(x, layout)
    x = backend.module.as_dense(x, geometry)
    return _cpu.forward(x, weight, bias, running_mean, running_var, float(momentum), float(eps), geometry, k,
                        out, dtype)


def backward(dy, x, save_mean, save_invstd, weight, layout, out, activation, y, residual, k):
    """:func:`fastbn.batch_norm_backward` in training with ``virtual_batch_size=k``;
    ``save_mean``, ``save_invstd`` float64 (slices, C) from the forward; returns
    ``(dx, dweight, dbias)``."""
    backend = _host_only({"dy": dy, "x": x, "save_mean": save_mean, "save_invstd": save_invstd,
                          "weight": weight, "out": out, "y": y},
                         activation is not None or y is not None or bool(residual))
    _checks.check_layout(layout)
    _checks.check_input(x, "x", backend.storage_dtypes, True)
    num_channels = x.shape[_checks.channel_axis(x.ndim, layout)]
    slices = num_slices(x.shape[0], k)
    _check_statistics({"save_mean": save_mean, "save_invstd": save_invstd}, (slices, num_channels), backend)
    # The statistics are checked above; these stand in for them in the checks of the rest.
    per_channel = np.zeros(num_channels)
    _checks.check_backward_args(dy, x, per_channel, per_channel, weight, True, layout, backend.storage_dtypes,
                                _param_dtype(x), backend.statistics_dtypes, True)
    dtype = _checks.dtype_of(x)
    _checks.check_out(out, "out", x.shape, dtype)
    if _checks.is_empty(x.shape):
        return batch_norm_backward(dy, x, per_channel, per_channel, weight, layout=layout, out=out)
    _check_slice_sizes(x.shape, layout, k)
    if slices == 1:
        return batch_norm_backward(dy, x, save_mean[0], save_invstd[0], weight, layout=layout, out=out)
    geometry = backend.module.geometry(x, layout)
    x, dy = backend.module.as_dense(x, geometry), backend.module.as_dense(dy, geometry)
    return _cpu.backward(dy, x, save_mean, save_invstd, weight, geometry, k, out, dtype)

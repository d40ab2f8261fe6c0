"""Adversarial data, float32: statistics as accurate as the float64 truth allows.

The truth is the float64 two-pass statistics of the *same* float32 values, so only the
kernels' arithmetic is measured, not the rounding of the inputs.  For comparison,
PyTorch 2.13's CPU channels_last path gives relative variance errors of 8.7 and 2e10
on the two offset cases below (it accumulates E[x^2] - E[x]^2 in float32).
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import elementwise_atol, stats_rtol, to_layout

# 3 channels x 102,400 values per channel (>= 100k, as required).
SHAPE_NCHW = (4, 3, 160, 160)


def offset_data(rng, layout, offset, spread):
    x = offset + spread * rng.standard_normal(to_layout(SHAPE_NCHW, layout))
    return x.astype(np.float32)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("offset, spread, required", [
    (1e4, 1.0, 1e-6),     # the bounds; the shifted float64 sums do far better
    (1e6, 0.01, 1e-4),
])
def test_offset_data_variance(rng, layout, offset, spread, required):
    x = offset_data(rng, layout, offset, spread)
    mean, var = fastbn.batch_stats(x, layout=layout)
    mean_true, var_true = reference.batch_stats(x, layout=layout)
    rel_var = np.max(np.abs(var - var_true) / var_true)
    assert rel_var <= required
    # The deviations d = x - k from a shift k taken from the data are exact in float64;
    # summing them costs n u relative to sum(d^2), which exceeds n var by at most the
    # condition factor 1 + max (x - mean)^2 / var (k is one of the x).  On the quantized
    # 1e6 + 0.01 randn data (float32 spacing 0.0625 > spread) that factor is ~10.
    n = x.size // 3
    axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
    centered = x.astype(np.float64) - np.expand_dims(mean_true, axes)
    condition = 1 + np.max(centered**2, axis=axes) / var_true
    assert np.all(np.abs(var - var_true) / var_true <= stats_rtol(n) * condition)
    np.testing.assert_allclose(mean, mean_true, rtol=stats_rtol(n))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_offset_data_normalizes_accurately(rng, layout):
    """y = (x - mean) * invstd on x = 1e6 + 0.01 randn: y is O(1) although x*a + b
    would cancel two ~1e8 float32 terms; errors stay at float32 rounding of y."""
    x = offset_data(rng, layout, 1e6, 0.01)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, layout=layout)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(x, layout=layout)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=elementwise_atol(np.float32, np.max(np.abs(y_ref))))
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout)
    dx_ref, _, _ = reference.batch_norm_backward(dy, x, mean_ref, invstd_ref, layout=layout)
    term = np.max(np.abs(dy)) * np.max(invstd) * 3
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=elementwise_atol(np.float32, term))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channels_give_zero_variance_and_bias(rng, layout, dtype):
    shape = to_layout((5, 4, 6, 7), layout)
    axis = 1 if layout == "NCHW" else 3
    values = np.array([0.0, 1e4, -3.25, 1e-20], dtype=dtype)
    x = np.moveaxis(np.broadcast_to(values, (5, 6, 7, 4)), -1, axis).astype(dtype)
    assert x.shape == shape
    bias = np.array([1.0, -2.0, 0.5, 3.0], dtype=dtype)
    weight = np.full(4, 2.0, dtype=dtype)
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                                layout=layout)
    _, var = fastbn.batch_stats(x, layout=layout)
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(mean, values.astype(np.float64))
    np.testing.assert_array_equal(y, np.moveaxis(np.broadcast_to(bias, (5, 6, 7, 4)), -1, axis))
    np.testing.assert_array_equal(rv, np.float64(0.9).astype(dtype))

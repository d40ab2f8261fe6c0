"""Backward through ``relu(bn(x) + residual)``: the ReLU mask (from the forward's
output ``y``) applied inside both backward passes, and the residual's gradient.

The reference masks ``dy`` with the same ``y`` (``0 where y <= 0``) and runs the float64
batch-norm backward; the fused dx differs from it by the plain backward's rounding
(``elementwise_atol`` with magnitude the largest |term|, ~ max|g| * max|weight *
invstd| * 3), and the residual's gradient, a selection, is exact.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import elementwise_atol, to_layout

pytestmark = pytest.mark.usefixtures("kernel_path")

LAYOUTS = ("NCHW", "NHWC")


def _forward(rng, layout, dtype, residual_kind, training, offset=0.0):
    x = (rng.standard_normal(to_layout((6, 5, 7, 4), layout)) + offset).astype(dtype)
    weight = rng.standard_normal(5).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype)
    residual = {"none": None, "x": x}.get(residual_kind, rng.standard_normal(x.shape).astype(dtype))
    rm, rv = np.full(5, offset, dtype), np.ones(5, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                                training=training, layout=layout, activation="relu",
                                                residual=residual)
    return x, weight, y, mean, invstd, residual


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype, residual_kind", [(np.float32, "none"), (np.float32, "separate"), (np.float32, "x"),
                                                  (np.float64, "separate")])
def test_masked_backward_matches_the_reference(rng, layout, dtype, training, residual_kind):
    x, weight, y, mean, invstd, residual = _forward(rng, layout, dtype, residual_kind, training,
                                                    offset=1e4 if training else 0.0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    with_residual = residual is not None
    result = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, training=training, layout=layout,
                                        activation="relu", y=y, residual=with_residual)
    expected = reference.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), mean, invstd,
                                             weight.astype(np.float64), training=training, layout=layout,
                                             activation="relu", y=y.astype(np.float64), residual=with_residual)
    assert len(result) == (4 if with_residual else 3)
    g = np.where(y <= 0, 0, dy)
    magnitude = 3 * np.abs(g).max() * np.abs(weight * invstd).max()
    np.testing.assert_allclose(result[0], expected[0], rtol=0, atol=elementwise_atol(dtype, magnitude))
    n = g.size // 5
    param_atol = 64 * n * np.finfo(dtype).eps * np.abs(g).max() * 4
    np.testing.assert_allclose(result[1], expected[1], rtol=0, atol=param_atol)
    np.testing.assert_allclose(result[2], expected[2], rtol=0, atol=param_atol)
    if with_residual:
        np.testing.assert_array_equal(result[3], g)
        assert result[3].dtype == x.dtype


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_is_applied_in_both_passes(rng, layout):
    """Equal to the plain backward of the masked gradient: a mask missing from either the
    sums pass or the dx pass changes dx."""
    x, weight, y, mean, invstd, _ = _forward(rng, layout, np.float64, "separate", True)
    dy = rng.standard_normal(x.shape)
    dx, dweight, dbias, dres = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout,
                                                          activation="relu", y=y, residual=True)
    g = np.where(y <= 0, 0.0, dy)
    plain = fastbn.batch_norm_backward(g, x, mean, invstd, weight, layout=layout)
    for fused, unfused in zip((dx, dweight, dbias), plain):
        np.testing.assert_allclose(fused, unfused, rtol=1e-13, atol=1e-13)
    assert (dres == 0).any() and (dres != 0).any()


def test_residual_without_activation_returns_dy(rng):
    x, weight, _, _, _, _ = _forward(rng, "NCHW", np.float32, "none", True)
    _, mean, invstd = fastbn.batch_norm_forward(x, weight)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, _, _, dres = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, residual=True)
    assert dres is dy
    saved = dy.copy()
    with pytest.raises(ValueError, match="^out: expected an array not sharing memory with dy"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, weight, residual=True, out=dy)
    np.testing.assert_array_equal(dy, saved)


def test_out_aliasing_dy_with_the_mask(rng):
    x, weight, y, mean, invstd, _ = _forward(rng, "NHWC", np.float32, "separate", True)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    expected = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout="NHWC", activation="relu", y=y,
                                          residual=True)
    work = dy.copy()
    dx, _, _, dres = fastbn.batch_norm_backward(work, x, mean, invstd, weight, layout="NHWC",
                                                activation="relu", y=y, residual=True, out=work)
    assert dx is work
    np.testing.assert_array_equal(dx, expected[0])
    np.testing.assert_array_equal(dres, expected[3])


def test_mask_follows_threshold_backward_on_nan_and_zero(rng):
    """g = 0 where y <= 0 (so y == 0 masks), and a NaN y keeps dy, as torch's threshold_backward."""
    x, weight, y, mean, invstd, _ = _forward(rng, "NCHW", np.float32, "separate", True)
    y = y.copy()
    y[0, 0, 0, :2] = (np.nan, 0.0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, _, _, dres = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, activation="relu", y=y, residual=True)
    assert dres[0, 0, 0, 0] == dy[0, 0, 0, 0] and dres[0, 0, 0, 1] == 0

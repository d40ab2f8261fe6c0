"""Fused forward epilogues: ``relu(bn(x) + residual)`` and ``relu(bn(x))`` in the apply
pass, against the float64 reference of the unfused ops.

Tolerance: the fused pass computes ``(x - center) * scale + shift``, adds the residual
and takes ``max(., 0)``: one rounding more than the plain apply (the add; the max is
exact), inside ``elementwise_atol``'s 6-rounding budget, with ``magnitude`` the largest
|bn(x)| + |residual|.  Data offset by 1e4 add the statistics' float64 error
(``stats_rtol`` of the offset) times the largest |weight * invstd|.  Near 0 a value the reference clamps to 0 may stay a few ulps
positive: still within the same absolute bound.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import elementwise_atol, stats_rtol, to_layout

pytestmark = pytest.mark.usefixtures("kernel_path")

LAYOUTS = ("NCHW", "NHWC")


def _case(rng, layout, dtype, offset=0.0, shape=(6, 5, 7, 4)):
    x = (rng.standard_normal(to_layout(shape, layout)) + offset).astype(dtype)
    residual = rng.standard_normal(x.shape).astype(dtype)
    c = shape[1]
    weight = rng.standard_normal(c).astype(dtype)
    bias = rng.standard_normal(c).astype(dtype)
    return x, residual, weight, bias


def _reference(x, weight, bias, **kwargs):
    r = kwargs.get("residual")
    if r is not None:
        kwargs["residual"] = r.astype(np.float64)
    for name in ("running_mean", "running_var"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].astype(np.float64)
    return reference.batch_norm_forward(x.astype(np.float64), weight.astype(np.float64),
                                        bias.astype(np.float64), **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype, epilogue", [(np.float32, "relu"), (np.float32, "add"), (np.float32, "add_relu"),
                                             (np.float32, "x_relu"), (np.float64, "add_relu")])
def test_fused_forward_matches_the_unfused_reference(rng, layout, dtype, training, epilogue):
    offset = 1e4 if training else 0.0
    x, residual, weight, bias = _case(rng, layout, dtype, offset=offset)
    activation = None if epilogue == "add" else "relu"
    residual = {"relu": None, "x_relu": x}.get(epilogue, residual)
    rm, rv = (rng.standard_normal(5).astype(dtype), rng.uniform(0.5, 2, 5).astype(dtype))
    kwargs = dict(running_mean=rm.copy(), running_var=rv.copy(), training=training, layout=layout)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, activation=activation, residual=residual,
                                                **kwargs)
    kwargs.update(running_mean=rm.copy(), running_var=rv.copy())
    y_ref, mean_ref, _ = _reference(x, weight, bias, activation=activation, residual=residual, **kwargs)
    plain, _, _ = _reference(x, weight, bias, **kwargs)
    magnitude = np.abs(plain).max() + (0 if residual is None else np.abs(residual).max())
    statistics = stats_rtol(x.size // 5) * offset * np.abs(weight.astype(np.float64) * invstd).max()
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=elementwise_atol(dtype, magnitude) + statistics)
    if activation == "relu":
        assert (y >= 0).all()
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_place_with_x_as_the_residual(rng, layout):
    x, _, weight, bias = _case(rng, layout, np.float32)
    expected, _, _ = _reference(x, weight, bias, activation="relu", residual=x, layout=layout)
    work = x.copy()
    y, _, _ = fastbn.batch_norm_forward(work, weight, bias, activation="relu", residual=work, out=work,
                                        layout=layout)
    assert y is work
    np.testing.assert_allclose(y, expected, rtol=0, atol=elementwise_atol(np.float32, 8))


def test_constant_groups_and_one_value_per_plane(rng):
    x = np.repeat(rng.standard_normal((5, 3, 1, 1)), 4, axis=2).astype(np.float32)
    x[:, 1] = 7.0  # channel 1 constant: var 0, bn(x) = bias
    residual = rng.standard_normal(x.shape).astype(np.float32)
    bias = np.array([0.0, -2.0, 1.0], np.float32)
    y, _, _ = fastbn.batch_norm_forward(x, None, bias, activation="relu", residual=residual)
    np.testing.assert_array_equal(y[:, 1], np.maximum(residual[:, 1] - 2.0, 0))
    y_ref, _, _ = _reference(x, np.ones(3, np.float32), bias, activation="relu", residual=residual)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=elementwise_atol(np.float32, 8))


def test_nan_propagates_through_the_relu(rng):
    x, residual, weight, bias = _case(rng, "NCHW", np.float32)
    residual[0, 0, 0, 0] = np.nan
    y, _, _ = fastbn.batch_norm_forward(x, weight, bias, activation="relu", residual=residual)
    assert np.isnan(y[0, 0, 0, 0]) and np.isfinite(np.delete(y.ravel(), 0)).all()

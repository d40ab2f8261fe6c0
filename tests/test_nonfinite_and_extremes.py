"""Non-finite and extreme values.

NaN/±Inf make their channel's batch statistics, running statistics and ``y`` NaN in
training (as PyTorch) and never leak into other channels; in eval they stay elementwise.
A constant channel (var 0) gives ``y = bias`` exactly for any eps > 0, even eps = 1e-300
whose 1/sqrt(eps) overflows float32.  Subnormal inputs and magnitudes up to 1e37
(float32) / 1e150 (float64), whose squares overflow the input dtype, keep finite
statistics through the float64 accumulators.

Tolerances.  ``y`` uses :func:`conftest._atol` (16 eps times the largest term) on the
unaffected channels.  Statistics are float64 on both sides and agree to ~1e-13 relative
on these small inputs; they are checked at 1e-10, and at 1e-9 for the subnormal and huge
inputs, where these tests are about staying finite rather than about the last digits.
The constant channel's ``y`` is compared exactly: ``x - mean`` is exactly 0 there.
"""

import numpy as np
import pytest

from _helpers import DTYPES, LAYOUTS, B, F, S, _atol, _ref_forward, _x

# Serial small-tensor kernels and the parallel planes/rows kernels (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")


def _put(x, layout, channel, value, index=1):
    """Set one element of ``channel`` (at batch ``index``) to ``value``."""
    if layout == "NCHW":
        x[index, channel].flat[2] = value
    else:
        x[index, ..., channel].flat[2] = value


def _channel(a, layout, c):
    return a[:, c] if layout == "NCHW" else a[..., c]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("first", [False, True])
def test_nonfinite_poisons_only_its_channel(layout, dtype, value, first):
    """As PyTorch: a NaN/Inf makes its channel's statistics and y NaN, other channels exact."""
    shape = (3, 4, 5, 5) if layout == "NCHW" else (3, 5, 5, 4)
    x = _x(shape, dtype, seed=10)
    bad = 2
    if first:  # the very first value of the channel (the shift k of the shifted sums)
        _channel(x, layout, bad).flat[0] = value
    else:
        _put(x, layout, bad, value)
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    y, mean, invstd = F(x, running_mean=rm, running_var=rv, layout=layout)
    yr, mr, sr = _ref_forward(x, layout=layout)
    assert np.isnan(_channel(y, layout, bad)).all()
    assert np.isnan(invstd[bad]) and not np.isfinite(mean[bad])
    assert not np.isfinite(rm[bad]) and np.isnan(rv[bad])
    good = [c for c in range(4) if c != bad]
    for c in good:
        ref = _channel(yr, layout, c)
        np.testing.assert_allclose(_channel(y, layout, c), ref, rtol=0, atol=_atol(dtype, np.abs(ref).max()))
    np.testing.assert_allclose(mean[good], mr[good], rtol=1e-10, atol=1e-12)
    assert np.isfinite(rm[good]).all() and np.isfinite(rv[good]).all()

    # Backward: a NaN in dy of one channel stays in that channel.
    dy = _x(shape, dtype, seed=11)
    _put(dy, layout, 1, np.nan)
    x_clean = _x(shape, dtype, seed=10)
    _, m, s = F(x_clean, layout=layout)
    dx, dw, db = B(dy, x_clean, m, s, layout=layout)
    assert np.isnan(_channel(dx, layout, 1)).all() and np.isnan(dw[1]) and np.isnan(db[1])
    others = [0, 2, 3]
    assert np.isfinite(dw[others]).all() and np.isfinite(db[others]).all()
    for c in others:
        assert np.isfinite(_channel(dx, layout, c)).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_in_eval_stays_elementwise(layout, dtype):
    shape = (3, 4, 5) if layout == "NCHW" else (3, 5, 4)
    x = _x(shape, dtype, seed=12)
    _put(x, layout, 1, np.inf)
    _put(x, layout, 2, np.nan)
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    y = F(x, running_mean=rm, running_var=rv, training=False, layout=layout)[0]
    assert np.isposinf(y).sum() == 1 and np.isnan(y).sum() == 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-30, 1e-300])
def test_constant_channel_gives_bias(layout, dtype, eps):
    """var = 0: y = bias exactly (not NaN), even when 1/sqrt(eps) overflows float32."""
    shape = (4, 3, 6) if layout == "NCHW" else (4, 6, 3)
    x = _x(shape, dtype, seed=13)
    _channel(x, layout, 1)[...] = 3.25
    bias = np.array([0.0, 7.5, -1.0], dtype)
    y, mean, invstd = F(x, np.ones(3, dtype), bias, eps=eps, layout=layout)
    np.testing.assert_array_equal(_channel(y, layout, 1), 7.5)
    assert mean[1] == 3.25 and invstd[1] == pytest.approx(1 / np.sqrt(eps), rel=1e-12)
    dx, dw, db = B(np.ones(shape, dtype), x, mean, invstd, layout=layout)
    assert not np.isnan(dx).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_denormal_inputs(layout):
    shape = (4, 3, 8) if layout == "NCHW" else (4, 8, 3)
    x = (_x(shape, np.float64, seed=14) * 1e-39).astype(np.float32)  # float32 subnormals
    assert (np.abs(x[x != 0]) < np.finfo(np.float32).tiny).all()
    y, mean, invstd = F(x, layout=layout)
    yr, mr, sr = _ref_forward(x, layout=layout)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(mean, mr, rtol=1e-9, atol=1e-50)
    np.testing.assert_allclose(invstd, sr, rtol=1e-9)
    np.testing.assert_allclose(y, yr, rtol=0, atol=_atol(np.float32, np.abs(yr).max()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, scale", [(np.float32, 1e30), (np.float32, 1e37), (np.float64, 1e150)])
def test_huge_magnitudes_do_not_overflow_the_statistics(layout, dtype, scale):
    """Sums of squares of 1e37 overflow float32 but not the float64 accumulators."""
    shape = (4, 3, 8) if layout == "NCHW" else (4, 8, 3)
    x = (_x(shape, np.float64, seed=15, offset=2.0) * scale).astype(dtype)
    y, mean, invstd = F(x, layout=layout)
    yr, mr, sr = _ref_forward(x, layout=layout)
    assert np.isfinite(yr).all() and np.isfinite(y).all() and np.isfinite(mean).all()
    np.testing.assert_allclose(mean, mr, rtol=1e-10)
    np.testing.assert_allclose(invstd, sr, rtol=1e-9)
    np.testing.assert_allclose(y, yr, rtol=0, atol=_atol(dtype, np.abs(yr).max()))
    m, v = S(x, layout=layout)
    assert np.isfinite(v).all()

"""The reference itself: its statistics against NumPy, its backward against finite differences."""

import numpy as np
import pytest

from fastbn import reference

from _helpers import channel_axis, to_layout


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batch_stats_match_numpy(rng, layout):
    x = rng.standard_normal(to_layout((3, 4, 5, 6), layout))
    axes = tuple(a for a in range(4) if a != channel_axis(4, layout))
    mean, var = reference.batch_stats(x, layout=layout)
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-14)
    np.testing.assert_allclose(var, x.var(axis=axes), rtol=1e-14)


def _loss(x, weight, bias, probe, training, layout, running):
    rm, rv = (None, None) if running is None else (running[0].copy(), running[1].copy())
    y, _, _ = reference.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                           training=training, layout=layout)
    return float(np.sum(y * probe))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_central_differences(rng, layout, training):
    """dL/dx, dL/dweight, dL/dbias of L = sum(y * probe) against central differences.

    Central differences with step h have truncation error O(h^2 * f''') and rounding
    error O(u * |L| / h); h = 1e-6 balances them near 1e-9 relative for this O(1) loss,
    so 1e-6 relative agreement leaves a wide margin while still catching any wrong term.
    """
    shape = to_layout((3, 2, 3, 2), layout)
    channels = shape[channel_axis(4, layout)]
    x = 2.0 + rng.standard_normal(shape)
    weight = rng.uniform(0.5, 1.5, channels)
    bias = rng.standard_normal(channels)
    probe = rng.standard_normal(shape)
    running = (rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels))

    rm, rv = running[0].copy(), running[1].copy()
    _, mean, invstd = reference.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                                   training=training, layout=layout)
    dx, dweight, dbias = reference.batch_norm_backward(probe, x, mean, invstd, weight,
                                                       training=training, layout=layout)

    h = 1e-6

    def numeric_gradient(array, loss):
        grad = np.empty_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + h
            up = loss()
            array[index] = saved - h
            down = loss()
            array[index] = saved
            grad[index] = (up - down) / (2 * h)
        return grad

    loss = lambda: _loss(x, weight, bias, probe, training, layout, running)  # noqa: E731
    np.testing.assert_allclose(dx, numeric_gradient(x, loss), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dweight, numeric_gradient(weight, loss), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbias, numeric_gradient(bias, loss), rtol=1e-6, atol=1e-7)


def test_running_stats_update_uses_unbiased_variance(rng):
    x = rng.standard_normal((5, 3, 4))
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    reference.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.25)
    n = 5 * 4
    np.testing.assert_allclose(rm, 0.75 * 0.5 + 0.25 * x.mean(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(rv, 0.75 * 2.0 + 0.25 * x.var(axis=(0, 2)) * n / (n - 1), rtol=1e-14)

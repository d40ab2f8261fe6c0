"""fastbn.BatchNorm, the NumPy layer: its passes against fastbn.reference.

The layer only sequences calls to the public functions, so its outputs are compared
with the float64 reference under the same per-element bounds as the core tests
(:func:`_helpers.elementwise_atol`); its own logic (mode, momentum, counters) is checked
exactly.  Errors and state: ``test_layers_state.py``; torch, device arrays and the
example: ``test_layers_interop.py``.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import stats_rtol
from _layers_helpers import C, assert_close, make_input, random_affine


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_matches_reference(rng, layout, dtype):
    layer = random_affine(fastbn.BatchNorm(C, momentum=0.3, layout=layout, dtype=dtype), rng)
    ref_mean, ref_var = np.zeros(C), np.ones(C)
    for _ in range(3):
        x = make_input(rng, layout, dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        x_before, dy_before = x.copy(), dy.copy()
        y = layer(x)
        dx = layer.backward(dy)
        y_ref, mean, invstd = reference.batch_norm_forward(
            x, layer.weight, layer.bias, running_mean=ref_mean, running_var=ref_var,
            training=True, momentum=0.3, layout=layout)
        dx_ref, dw_ref, db_ref = reference.batch_norm_backward(dy, x, mean, invstd, layer.weight, layout=layout)
        assert y.dtype == dx.dtype == layer.grad_weight.dtype == layer.grad_bias.dtype == dtype
        assert_close(y, y_ref, dtype)
        assert_close(dx, dx_ref, dtype)
        # Sums over 120 values per channel of O(3) terms: n * eps * magnitude.
        np.testing.assert_allclose(layer.grad_weight, dw_ref, rtol=0, atol=120 * 10 * np.finfo(dtype).eps)
        np.testing.assert_allclose(layer.grad_bias, db_ref, rtol=0, atol=120 * 10 * np.finfo(dtype).eps)
        # Running statistics: the batch statistics' float64 error (stats_rtol), then one
        # rounding to dtype per update, over three updates.
        running_rtol = 3 * (stats_rtol(120) + np.finfo(dtype).eps)
        np.testing.assert_allclose(layer.running_mean, ref_mean, rtol=running_rtol, atol=1e-15)
        np.testing.assert_allclose(layer.running_var, ref_var, rtol=running_rtol, atol=0)
        np.testing.assert_array_equal(x, x_before)
        np.testing.assert_array_equal(dy, dy_before)
    assert layer.num_batches_tracked == 3


def test_nhwc_layer_equals_transposed_nchw_layer(rng):
    nchw = fastbn.BatchNorm(C, dtype=np.float64)
    nhwc = fastbn.BatchNorm(C, layout="NHWC", dtype=np.float64)
    x = make_input(rng)
    dy = rng.standard_normal(x.shape)
    to_nhwc = (0, 2, 3, 1)
    y = nchw(x)
    y_nhwc = nhwc(np.ascontiguousarray(x.transpose(to_nhwc)))
    np.testing.assert_allclose(y_nhwc, y.transpose(to_nhwc), rtol=0, atol=1e-13)
    np.testing.assert_allclose(nhwc.backward(np.ascontiguousarray(dy.transpose(to_nhwc))),
                               nchw.backward(dy).transpose(to_nhwc), rtol=0, atol=1e-13)
    np.testing.assert_allclose(nhwc.running_var, nchw.running_var, rtol=1e-14)


@pytest.mark.parametrize("shape_nchw", [(8, 3), (4, 3, 7), (2, 3, 2, 3, 4)])
def test_every_rank(rng, shape_nchw):
    layer = fastbn.BatchNorm(C, dtype=np.float64)
    x = make_input(rng, shape_nchw=shape_nchw)
    dy = rng.standard_normal(x.shape)
    y_ref, mean, invstd = reference.batch_norm_forward(x, np.ones(C), np.zeros(C))
    assert_close(layer(x), y_ref, np.float64)
    assert_close(layer.backward(dy), reference.batch_norm_backward(dy, x, mean, invstd, np.ones(C))[0],
                 np.float64)


def test_eval_uses_running_stats_and_frozen_gradient(rng):
    layer = random_affine(fastbn.BatchNorm(C, dtype=np.float64), rng)
    for _ in range(2):
        layer(make_input(rng))
    state = layer.state_dict()
    assert layer.eval() is layer and layer.training is False
    x = make_input(rng)
    dy = rng.standard_normal(x.shape)
    y = layer(x)
    dx = layer.backward(dy)
    y_ref, mean, invstd = reference.batch_norm_forward(
        x, layer.weight, layer.bias, running_mean=state["running_mean"],
        running_var=state["running_var"], training=False)
    dx_ref, dw_ref, db_ref = reference.batch_norm_backward(dy, x, mean, invstd, layer.weight, training=False)
    assert_close(y, y_ref, np.float64)
    assert_close(dx, dx_ref, np.float64)
    np.testing.assert_allclose(layer.grad_weight, dw_ref, rtol=1e-12)
    np.testing.assert_allclose(layer.grad_bias, db_ref, rtol=1e-12)
    # Eval neither updates nor counts.
    for key, value in state.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value)
    assert layer.train() is layer and layer.training is True


def test_momentum_none_is_cumulative_average(rng):
    layer = fastbn.BatchNorm(C, momentum=None, dtype=np.float64)
    batches = [make_input(rng) for _ in range(4)]
    for x in batches:
        layer(x)
    n = x.size // C
    means = [reference.batch_stats(x)[0] for x in batches]
    unbiased_vars = [reference.batch_stats(x)[1] * n / (n - 1) for x in batches]
    # The first update has momentum 1: the initial (0, 1) values drop out entirely.
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, np.mean(unbiased_vars, axis=0), rtol=1e-13)
    assert layer.num_batches_tracked == 4


@pytest.mark.parametrize("training", [True, False])
def test_without_running_stats_always_uses_batch_stats(rng, training):
    layer = fastbn.BatchNorm(C, track_running_stats=False, dtype=np.float64).train(training)
    assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None
    x = make_input(rng)
    dy = rng.standard_normal(x.shape)
    y_ref, mean, invstd = reference.batch_norm_forward(x, np.ones(C), np.zeros(C))
    dx_ref, _, _ = reference.batch_norm_backward(dy, x, mean, invstd, np.ones(C), training=True)
    assert_close(layer(x), y_ref, np.float64)
    assert_close(layer.backward(dy), dx_ref, np.float64)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_without_affine(rng):
    layer = fastbn.BatchNorm(C, affine=False, dtype=np.float64)
    assert layer.weight is None and layer.bias is None
    x = make_input(rng)
    dy = rng.standard_normal(x.shape)
    y_ref, mean, invstd = reference.batch_norm_forward(x)
    assert_close(layer(x), y_ref, np.float64)
    assert_close(layer.backward(dy), reference.batch_norm_backward(dy, x, mean, invstd)[0], np.float64)
    assert layer.grad_weight is None and layer.grad_bias is None
    assert set(layer.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_backward_uses_the_forward_weight(rng):
    """Replacing ``weight`` between forward and backward (an optimizer step done early)
    must not change the gradient of the forward pass that ran."""
    layer = random_affine(fastbn.BatchNorm(C, dtype=np.float64), rng)
    x = make_input(rng)
    dy = rng.standard_normal(x.shape)
    layer(x)
    expected = layer.backward(dy)
    layer.weight = layer.weight * 3.0
    np.testing.assert_array_equal(layer.backward(dy), expected)

"""Virtual ("ghost") batches, ``virtual_batch_size=k``: statistics per slice of k samples
along N, checked against the float64 reference (a plain loop over the slices), forward
and backward, in both layouts and kernel paths (serial small-tensor and parallel)."""

import numpy as np
import pytest

import fastbn
from fastbn import reference
from _helpers import U64, _atol, to_layout

EPS32 = np.finfo(np.float32).eps

#: (layout, NCHW-ordered shape, k): ranks 2-4, k dividing N and not (the last slice
#: smaller: 10 = 3 + 3 + 3 + 1 samples, 11 = 3 + 3 + 3 + 2).
CASES = [
    ("NCHW", (10, 3, 4, 5), 3),
    ("NHWC", (10, 3, 4, 5), 4),
    ("NCHW", (12, 5), 4),
    ("NHWC", (11, 5), 3),
    ("NCHW", (8, 3, 6), 4),
    ("NHWC", (9, 3, 6), 2),
]


def _inputs(layout, shape, offset=1e4, seed=0):
    rng = np.random.default_rng(seed)
    shape = to_layout(shape, layout)
    num_c = shape[1] if layout == "NCHW" else shape[-1]
    x = (offset + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, num_c).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, num_c).astype(np.float32)
    running = (rng.standard_normal(num_c).astype(np.float32), rng.uniform(0.5, 2, num_c).astype(np.float32))
    return x, dy, weight, bias, running


def _per_channel(v, x, layout):
    """A (slices, C) statistic repeated per sample and broadcast like x."""
    return v.reshape(v.shape[0], *(1 if a != (1 if layout == "NCHW" else x.ndim - 1) else -1
                                   for a in range(1, x.ndim)))


@pytest.mark.parametrize("layout, shape, k", CASES)
def test_matches_the_reference(kernel_path, layout, shape, k):
    x, dy, weight, bias, (rm, rv) = _inputs(layout, shape)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv, layout=layout,
                                                virtual_batch_size=k)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(
        x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64), running_mean=rm_ref,
        running_var=rv_ref, layout=layout, virtual_batch_size=k)
    num_slices = -(-x.shape[0] // k)
    assert mean.shape == invstd.shape == (num_slices, weight.size) and mean.dtype == np.float64
    # Shifted float64 sums are exact up to O(n u) of the spread (1); the per-sample means
    # Chan-merged on the planes path carry |offset| * u each, relative to the spread.
    stats_rtol = 64 * (1 + 1e4) * U64
    np.testing.assert_allclose(mean, mean_ref, rtol=stats_rtol)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=stats_rtol)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=_atol(np.float32, np.abs(y_ref).max()))
    # Running statistics are float32: the float64 update rounded once (1/2 ulp), one more for margin.
    np.testing.assert_allclose(rm, rm_ref, rtol=EPS32)
    np.testing.assert_allclose(rv, rv_ref, rtol=EPS32)

    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout,
                                                    virtual_batch_size=k)
    dx_ref, dweight_ref, dbias_ref = reference.batch_norm_backward(
        dy.astype(np.float64), x.astype(np.float64), mean_ref, invstd_ref, weight.astype(np.float64),
        layout=layout, virtual_batch_size=k)
    # dx's terms are each at most |weight * invstd * dy| (x_hat and the means are O(1)):
    # small slices have large invstd and dx ~ 0 (two samples: exactly 0) from cancelling terms.
    scale = np.abs(weight).max() * invstd_ref.max() * np.abs(dy).max()
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=_atol(np.float32, max(scale, np.abs(dx_ref).max())))
    x_hat = np.abs(x.astype(np.float64) - np.repeat(_per_channel(mean_ref, x, layout), k, axis=0)[:x.shape[0]])
    x_hat *= np.repeat(_per_channel(invstd_ref, x, layout), k, axis=0)[:x.shape[0]]
    axes = tuple(a for a in range(x.ndim) if a != (1 if layout == "NCHW" else x.ndim - 1))
    # float64 sums rounded once to float32 (relative to the sum of magnitudes), 4x margin.
    np.testing.assert_allclose(dweight, dweight_ref, rtol=0, atol=4 * EPS32 * (np.abs(dy) * x_hat).sum(axis=axes).max())
    np.testing.assert_allclose(dbias, dbias_ref, rtol=0, atol=4 * EPS32 * np.abs(dy).sum(axis=axes).max())


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_slices_are_normalized_independently(layout):
    """Each slice standardized on its own: a slice shifted by 1e3 has the same y."""
    x, _, _, _, _ = _inputs(layout, (8, 3, 2, 3), offset=0.0)
    shifted = x.copy()
    shifted[4:] += 1e3
    y, mean, invstd = fastbn.batch_norm_forward(x, layout=layout, virtual_batch_size=4)
    y_shifted, mean_shifted, invstd_shifted = fastbn.batch_norm_forward(shifted, layout=layout, virtual_batch_size=4)
    np.testing.assert_array_equal(y_shifted[:4], y[:4])
    np.testing.assert_array_equal(mean_shifted[0], mean[0])
    # x + 1e3 rounds to float32 (ulp 6e-5): that much changes in the second slice, times invstd ~1.
    np.testing.assert_allclose(mean_shifted[1] - mean[1], 1e3, rtol=0, atol=1e-4)
    np.testing.assert_allclose(invstd_shifted[1], invstd[1], rtol=1e-3)
    np.testing.assert_allclose(y_shifted[4:], y[4:], rtol=0, atol=1e-3)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("k", [6, 50])
def test_one_slice_is_plain_batch_norm_bitwise(layout, k):
    """k >= N: the plain batch-norm path runs, so every result is bitwise equal."""
    x, dy, weight, bias, (rm, rv) = _inputs(layout, (6, 3, 4, 4))
    rm2, rv2 = rm.copy(), rv.copy()
    ghost = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv, layout=layout,
                                      virtual_batch_size=k)
    plain = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm2, running_var=rv2, layout=layout)
    assert ghost[1].shape == (1, 3)
    for a, b in zip(ghost, plain):
        np.testing.assert_array_equal(a.reshape(b.shape), b)
    np.testing.assert_array_equal(rm, rm2)
    np.testing.assert_array_equal(rv, rv2)
    grads = fastbn.batch_norm_backward(dy, x, ghost[1], ghost[2], weight, layout=layout, virtual_batch_size=k)
    for a, b in zip(grads, fastbn.batch_norm_backward(dy, x, plain[1], plain[2], weight, layout=layout)):
        np.testing.assert_array_equal(a, b)


def test_eval_ignores_virtual_batch_size():
    x, dy, weight, bias, (rm, rv) = _inputs("NCHW", (6, 3, 2, 2))
    ghost = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv, training=False,
                                      virtual_batch_size=2)
    plain = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv, training=False)
    for a, b in zip(ghost, plain):
        np.testing.assert_array_equal(a, b)
    grads = fastbn.batch_norm_backward(dy, x, ghost[1], ghost[2], weight, training=False, virtual_batch_size=2)
    for a, b in zip(grads, fastbn.batch_norm_backward(dy, x, plain[1], plain[2], weight, training=False)):
        np.testing.assert_array_equal(a, b)


def test_constant_slice_gives_bias_and_one_sample_slices_work_with_spatial_axes():
    """k = 1 with a spatial axis is instance-norm-like; a constant slice has var 0: y = bias."""
    x, _, weight, bias, _ = _inputs("NCHW", (4, 3, 5), offset=0.0)
    x[2] = 7.0
    y, _, invstd = fastbn.batch_norm_forward(x, weight, bias, virtual_batch_size=1)
    np.testing.assert_array_equal(y[2], np.broadcast_to(bias[:, None], (3, 5)))
    y_ref = reference.batch_norm_forward(x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64),
                                         virtual_batch_size=1)[0]
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=_atol(np.float32, np.abs(y_ref).max()))


def test_strided_input_and_in_place_output():
    x, dy, weight, bias, _ = _inputs("NCHW", (7, 3, 4, 8))
    xs = x[:, :, :, ::2]
    expected = reference.batch_norm_forward(xs.astype(np.float64), weight.astype(np.float64),
                                            bias.astype(np.float64), virtual_batch_size=3)[0]
    out = xs.copy()
    y = fastbn.batch_norm_forward(out, weight, bias, out=out, virtual_batch_size=3)[0]
    assert y is out
    np.testing.assert_allclose(out, expected, rtol=0, atol=_atol(np.float32, np.abs(expected).max()))


def test_channel_last_layout_over_channel_first_memory():
    """An NHWC view of NCHW bytes runs the planes path (per-(n, c) moments merged per slice)."""
    x, dy, weight, bias, _ = _inputs("NCHW", (7, 3, 4, 5))
    xv, dyv = (np.moveaxis(a, 1, -1) for a in (x, dy))
    y, mean, invstd = fastbn.batch_norm_forward(xv, weight, bias, layout="NHWC", virtual_batch_size=3)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(
        xv.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64), layout="NHWC",
        virtual_batch_size=3)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=_atol(np.float32, np.abs(y_ref).max()))
    dx = fastbn.batch_norm_backward(dyv, xv, mean, invstd, weight, layout="NHWC", virtual_batch_size=3)[0]
    dx_ref = reference.batch_norm_backward(dyv.astype(np.float64), xv.astype(np.float64), mean_ref, invstd_ref,
                                           weight.astype(np.float64), layout="NHWC", virtual_batch_size=3)[0]
    scale = np.abs(weight).max() * invstd_ref.max() * np.abs(dy).max()
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=_atol(np.float32, scale))


def test_empty_batch():
    x = np.empty((0, 3, 2), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, virtual_batch_size=2)
    assert y.shape == x.shape and mean.shape == invstd.shape == (0, 3)
    np.testing.assert_array_equal(rm, 0.0)
    dx, dweight, dbias = fastbn.batch_norm_backward(x, x, mean, invstd, virtual_batch_size=2)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dbias, 0.0)


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("k, error, match", [
    (0, ValueError, "^virtual_batch_size: expected None or a positive int, got 0"),
    (-3, ValueError, "^virtual_batch_size: expected None or a positive int"),
    (2.0, TypeError, "^virtual_batch_size: expected None or a positive int, got float"),
    (True, TypeError, "^virtual_batch_size: expected None or a positive int, got bool"),
    ("4", TypeError, "^virtual_batch_size: expected"),
])
def test_bad_virtual_batch_size(k, error, match):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(error, match=match):
        fastbn.batch_norm_forward(x, virtual_batch_size=k)
    with pytest.raises(error, match=match):
        fastbn.batch_norm_backward(x, x, np.zeros((2, 3)), np.ones((2, 3)), virtual_batch_size=k)
    with pytest.raises(error, match=match):
        fastbn.BatchNorm(3, virtual_batch_size=k)


@pytest.mark.parametrize("shape, k", [((6, 3), 1), ((5, 3), 2)])
def test_slice_of_one_value_per_channel_is_refused_and_nothing_is_written(shape, k):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full_like(x, 5.0)
    with pytest.raises(ValueError, match="^Expected more than 1 value per channel when training, got a virtual "
                                         "batch of 1 sample"):
        fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, out=out, virtual_batch_size=k)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    np.testing.assert_array_equal(out, 5.0)


def test_epilogues_are_refused():
    x = np.ones((4, 3, 2), np.float32)
    with pytest.raises(ValueError, match="^virtual_batch_size: expected no activation"):
        fastbn.batch_norm_forward(x, activation="relu", virtual_batch_size=2)
    with pytest.raises(ValueError, match="^virtual_batch_size: expected no activation"):
        fastbn.batch_norm_forward(x, residual=x, virtual_batch_size=2)
    with pytest.raises(ValueError, match="^virtual_batch_size: expected no activation"):
        fastbn.batch_norm_backward(x, x, np.zeros((2, 3)), np.ones((2, 3)), activation="relu", y=x,
                                   virtual_batch_size=2)


@pytest.mark.parametrize("shape, error, match", [
    ((3,), ValueError, r"^save_mean: expected shape \(2, 3\) \(from the forward pass\), got \(3,\)"),
    ((3, 3), ValueError, r"^save_mean: expected shape \(2, 3\)"),
])
def test_backward_statistics_of_the_wrong_shape(shape, error, match):
    x = np.ones((4, 3, 2), np.float32)
    with pytest.raises(error, match=match):
        fastbn.batch_norm_backward(x, x, np.zeros(shape), np.ones((2, 3)), virtual_batch_size=2)


# --------------------------------------------------------------------------- layer

def test_layer_matches_the_functional_calls_and_eval_uses_running_statistics():
    x, dy, _, _, _ = _inputs("NHWC", (10, 3, 2, 2))
    layer = fastbn.BatchNorm(3, layout="NHWC", virtual_batch_size=4)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, layout="NHWC",
                                                virtual_batch_size=4)
    np.testing.assert_array_equal(layer(x), y)
    np.testing.assert_array_equal(layer.running_mean, rm)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, np.ones(3, np.float32), layout="NHWC",
                                                    virtual_batch_size=4)
    np.testing.assert_array_equal(layer.backward(dy), dx)
    np.testing.assert_array_equal(layer.grad_weight, dweight)
    assert "virtual_batch_size=4" in repr(layer)
    layer.eval()
    expected = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False, layout="NHWC")[0]
    np.testing.assert_array_equal(layer(x), expected)


def test_layer_refuses_comm_with_virtual_batches():
    with pytest.raises(ValueError, match="^virtual_batch_size: expected None with comm"):
        fastbn.BatchNorm(3, virtual_batch_size=2, comm=object())

"""Group and instance norm against the float64 reference: both layouts, ranks 2-5, both
kernel paths (serial small tensors and the parallel planes/rows kernels), adversarial data."""

import math

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import _x
from _norms_helpers import assert_close_to_reference, channels_last

SHAPES = [(3, 4), (2, 6, 5), (2, 4, 5, 3), (2, 4, 3, 2, 3)]


def _case(shape, layout, dtype, offset=0.0, seed=0):
    x = _x(shape, dtype, seed, offset)
    dy = _x(shape, dtype, seed + 1)
    if layout == "NHWC":
        x, dy = channels_last(x), channels_last(dy)
    num_channels = shape[1]
    weight = _x((num_channels,), dtype, seed + 2)
    bias = _x((num_channels,), dtype, seed + 3)
    return x, dy, weight, bias


def _check_group(x, dy, num_groups, weight, bias, layout, dtype):
    count = math.prod(x.shape) // (x.shape[0] * num_groups)
    got = fastbn.group_norm_forward(x, num_groups, weight, bias, layout=layout)
    want = reference.group_norm_forward(x, num_groups, weight, bias, layout=layout)
    assert got[0].dtype == x.dtype and got[1].dtype == np.float64 and got[1].shape == (x.shape[0], num_groups)
    assert_close_to_reference(got, want, dtype, count)
    back = fastbn.group_norm_backward(dy, x, num_groups, got[1], got[2], weight, layout=layout)
    back_want = reference.group_norm_backward(dy, x, num_groups, got[1], got[2], weight, layout=layout)
    assert back[1].dtype == x.dtype
    assert_close_to_reference(back, back_want, dtype, count * x.shape[0])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_group_norm_matches_reference(kernel_path, shape, dtype, layout):
    x, dy, weight, bias = _case(shape, layout, dtype)
    _check_group(x, dy, 2, weight, bias, layout, dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_group_norm_large_offset_and_parallel_sizes(layout):
    """1e4 + randn over 2 * 8 * 96 * 96 values (parallel kernels, several plane blocks)."""
    x, dy, weight, bias = _case((2, 8, 96, 96), layout, np.float32, offset=1e4)
    _check_group(x, dy, 4, weight, bias, layout, np.float32)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_group_norm_without_affine_and_noncontiguous(layout):
    base, dy, _, _ = _case((3, 6, 4, 10), layout, np.float64)
    x = base[..., ::2] if layout == "NCHW" else base[:, :, ::2]
    dy = dy[..., ::2] if layout == "NCHW" else dy[:, :, ::2]
    _check_group(x, dy, 3, None, None, layout, np.float64)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_constant_groups_give_bias(layout):
    x = np.full((2, 4, 3, 3), 7.25, np.float32)
    x[:, 2:] = -1e4  # the second group constant too, another value
    x = channels_last(x) if layout == "NHWC" else x
    bias = np.arange(4, dtype=np.float32)
    y, mean, invstd = fastbn.group_norm_forward(x, 2, np.ones(4, np.float32), bias, layout=layout)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape) if layout == "NHWC"
                                  else np.broadcast_to(bias[:, None, None], y.shape))
    np.testing.assert_array_equal(mean, [[7.25, -1e4]] * 2)
    dy = np.ones_like(x)
    dx, _, dbias = fastbn.group_norm_backward(dy, x, 2, mean, invstd, None, layout=layout)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dbias, 18)


def test_one_value_per_group():
    """Rank 2 with G = C: each group one value, var 0, y = bias and dx = 0."""
    x, dy, weight, bias = _case((3, 4), "NCHW", np.float64)
    y, _, invstd = fastbn.group_norm_forward(x, 4, weight, bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))
    np.testing.assert_allclose(invstd, 1 / math.sqrt(1e-5))
    dx, dweight, dbias = fastbn.group_norm_backward(dy, x, 4, _, invstd, weight)
    # dx = dy * w * invstd - invstd * (w * dy): exact 0 up to the rounding of terms ~invstd * |w dy|
    np.testing.assert_allclose(dx, 0, atol=8 * np.finfo(np.float64).eps * np.max(np.abs(dy * weight)) / math.sqrt(1e-5))
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_allclose(dbias, dy.sum(axis=0), rtol=1e-15)


def test_out_and_in_place():
    x, _, weight, bias = _case((2, 4, 6, 6), "NCHW", np.float32)
    want = fastbn.group_norm(x, 2, weight, bias)
    x_copy = x.copy()
    y, _, _ = fastbn.group_norm_forward(x_copy, 2, weight, bias, out=x_copy)
    assert y is x_copy
    np.testing.assert_array_equal(y, want)
    out = np.empty_like(channels_last(x))
    fastbn.group_norm_forward(channels_last(x), 2, weight, bias, layout="NHWC", out=out)
    np.testing.assert_allclose(out, channels_last(want), atol=1e-6)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("use_running", [False, True])
def test_instance_norm_matches_reference(kernel_path, layout, use_running):
    x, _, weight, bias = _case((3, 4, 5, 3), layout, np.float32, offset=10.0)
    rm, rv = _x((4,), np.float32, 7), np.abs(_x((4,), np.float32, 8)) + 0.5
    stats = (rm.copy(), rv.copy()) if use_running else (None, None)
    stats_ref = (rm.astype(np.float64), rv.astype(np.float64)) if use_running else (None, None)
    y = fastbn.instance_norm(x, *stats, weight, bias, True, 0.3, layout=layout)
    want = reference.instance_norm(x, *stats_ref, weight, bias, True, 0.3, layout=layout)
    assert_close_to_reference((y,), (want,), np.float32, 15)
    if use_running:
        for got, ref in zip(stats, stats_ref):
            np.testing.assert_allclose(got, ref, rtol=4 * np.finfo(np.float32).eps)
        y_eval = fastbn.instance_norm(x, *stats, weight, bias, False, layout=layout)
        want_eval = reference.instance_norm(x, *stats, weight, bias, False, layout=layout)
        assert_close_to_reference((y_eval,), (want_eval,), np.float32, 15)


def test_instance_norm_is_group_norm_with_one_channel_per_group():
    x, _, weight, bias = _case((2, 3, 4, 4), "NHWC", np.float64)
    np.testing.assert_array_equal(fastbn.instance_norm(x, weight=weight, bias=bias, layout="NHWC"),
                                  fastbn.group_norm(x, 3, weight, bias, layout="NHWC"))

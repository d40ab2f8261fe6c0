"""Layer norm against the float64 reference: ranks 2-5, one or more normalized axes, the
serial and parallel sizes, adversarial data."""

import math

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import _x
from _norms_helpers import assert_close_to_reference


def _check_layer(x, dy, normalized_shape, weight, bias, dtype):
    k = math.prod(x.shape[x.ndim - len(normalized_shape):])
    got = fastbn.layer_norm_forward(x, normalized_shape, weight, bias)
    want = reference.layer_norm_forward(x, normalized_shape, weight, bias)
    assert got[1].shape == x.shape[:x.ndim - len(normalized_shape)] and got[1].dtype == np.float64
    assert_close_to_reference(got, want, dtype, k)
    back = fastbn.layer_norm_backward(dy, x, normalized_shape, got[1], got[2], weight)
    back_want = reference.layer_norm_backward(dy, x, normalized_shape, got[1], got[2], weight)
    assert back[1].shape == tuple(normalized_shape)
    assert_close_to_reference(back, back_want, dtype, x.size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, normalized", [((6, 10), (10,)), ((2, 5, 7), (7,)), ((2, 3, 4, 5), (4, 5)),
                                               ((2, 2, 3, 2, 3), (2, 3, 2, 3))])
def test_layer_norm_matches_reference(shape, normalized, dtype):
    x, dy = _x(shape, dtype, 0), _x(shape, dtype, 1)
    weight, bias = _x(normalized, dtype, 2), _x(normalized, dtype, 3)
    _check_layer(x, dy, normalized, weight, bias, dtype)


@pytest.mark.parametrize("shape", [(300, 160), (64, 48, 24)])
def test_layer_norm_large_offset_parallel_sizes(shape):
    """1e4 + randn over more than the serial-kernel size (parallel statistics and row passes)."""
    x, dy = _x(shape, np.float32, 0, offset=1e4), _x(shape, np.float32, 1)
    _check_layer(x, dy, shape[-1:], _x(shape[-1:], np.float32, 2), _x(shape[-1:], np.float32, 3), np.float32)


def test_layer_norm_without_affine_int_shape_noncontiguous():
    base = _x((8, 12), np.float64, 0)
    x, dy = base[::2, ::-1], _x((4, 12), np.float64, 1)
    _check_layer(x, dy, (12,), None, None, np.float64)


def test_constant_rows_and_single_element():
    x = np.full((3, 5), -2.5e4, np.float32)
    bias = np.arange(5, dtype=np.float32)
    y, mean, invstd = fastbn.layer_norm_forward(x, 5, None, bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (3, 5)))
    dx, dweight, dbias = fastbn.layer_norm_backward(np.ones_like(x), x, 5, mean, invstd)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_array_equal(dbias, 3)
    one = _x((4, 1), np.float64, 0)
    np.testing.assert_array_equal(fastbn.layer_norm(one, 1), 0)


def test_out_in_place():
    x = _x((16, 32), np.float32, 0)
    want = fastbn.layer_norm(x, 32)
    y, _, _ = fastbn.layer_norm_forward(x, 32, out=x)
    assert y is x
    np.testing.assert_array_equal(x, want)

"""Bad arguments of layer, group and instance norm: a ValueError/TypeError naming the
argument, raised before anything is written."""

import numpy as np
import pytest

import fastbn

X = np.zeros((2, 4, 3), np.float32)
W4 = np.ones(4, np.float32)


@pytest.mark.parametrize("call, error, message", [
    (lambda: fastbn.layer_norm(X, (4,)), ValueError, "normalized_shape: expected the trailing dimensions"),
    (lambda: fastbn.layer_norm(X, (2, 4, 3, 1)), ValueError, "normalized_shape"),
    (lambda: fastbn.layer_norm(X, "3"), TypeError, "normalized_shape: expected an int"),
    (lambda: fastbn.layer_norm(X, 3, np.ones(4, np.float32)), ValueError, "weight: expected shape (3,)"),
    (lambda: fastbn.layer_norm(X, 3, np.ones(3)), TypeError, "weight: expected dtype float32"),
    (lambda: fastbn.layer_norm(X, 3, eps=0.0), ValueError, "eps"),
    (lambda: fastbn.layer_norm(X.astype(np.int32), 3), TypeError, "x: expected dtype"),
    (lambda: fastbn.layer_norm_backward(X, X, 3, np.zeros(2), np.zeros((2, 4))), ValueError, "mean: expected shape"),
    (lambda: fastbn.layer_norm_backward(X, X[:1], 3, np.zeros((1, 4)), np.zeros((1, 4))), ValueError, "dy"),
    (lambda: fastbn.group_norm(X, 3), ValueError, "num_groups: expected a positive divisor"),
    (lambda: fastbn.group_norm(X, 0), ValueError, "num_groups"),
    (lambda: fastbn.group_norm(X, 2.0), TypeError, "num_groups: expected an int"),
    (lambda: fastbn.group_norm(X, 2, np.ones(3, np.float32)), ValueError, "weight: expected shape (4,)"),
    (lambda: fastbn.group_norm(X, 2, layout="NWC"), ValueError, "layout"),
    (lambda: fastbn.group_norm(X, 2, eps=-1), ValueError, "eps"),
    (lambda: fastbn.group_norm_backward(X, X, 2, np.zeros((2, 4)), np.zeros((2, 2))), ValueError,
     "mean: expected shape (2, 2)"),
    (lambda: fastbn.group_norm_backward(X, X, 2, np.zeros((2, 2)), np.zeros((2, 2), np.float16)), TypeError,
     "invstd: expected dtype"),
    (lambda: fastbn.instance_norm(X[:, :, 0]), ValueError, "x: expected an array of rank 3 to 5"),
    (lambda: fastbn.instance_norm(X, use_input_stats=False), ValueError, "running_mean"),
    (lambda: fastbn.instance_norm(X, use_input_stats=1), TypeError, "use_input_stats"),
    (lambda: fastbn.instance_norm(X, W4.copy(), None), ValueError, "running_var"),
    (lambda: fastbn.instance_norm(X, W4.copy(), W4.copy(), momentum=2.0), ValueError, "momentum"),
    (lambda: fastbn.instance_norm(X[:, :, :1], W4.copy(), W4.copy()), ValueError, "x: expected more than 1 spatial"),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(message.split(":")[0]) and message in str(info.value)


def test_nothing_written_on_failure():
    x = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    running_mean, running_var, out = np.zeros(4, np.float32), np.ones(4, np.float32), np.full_like(x, 5)
    with pytest.raises(ValueError):
        fastbn.instance_norm(x, running_mean, running_var, eps=0.0)
    with pytest.raises(ValueError):
        fastbn.group_norm_forward(x, 3, out=out)
    np.testing.assert_array_equal(running_mean, 0)
    np.testing.assert_array_equal(running_var, 1)
    np.testing.assert_array_equal(out, 5)
    np.testing.assert_array_equal(x, np.arange(24).reshape(2, 4, 3))

"""Bad epilogue arguments raise a clear error naming the argument, before anything is written."""

import numpy as np
import pytest

import fastbn
from fastbn import reference, stages


@pytest.fixture
def data(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    return x, np.zeros(3, np.float32), np.ones(3, np.float32)


@pytest.mark.parametrize("forward", [fastbn.batch_norm_forward, reference.batch_norm_forward])
@pytest.mark.parametrize("kwargs, error, start", [
    (dict(activation="tanh"), ValueError, "activation: expected None or 'relu', got 'tanh'"),
    (dict(activation=1), ValueError, "activation: expected None or 'relu'"),
    (dict(residual=np.zeros((4, 3, 4), np.float32)), ValueError, "residual: expected the shape of x"),
    (dict(residual=np.zeros((4, 3, 5))), TypeError, "residual: expected the dtype of x (float32)"),
    (dict(residual=[1.0]), TypeError, "residual: expected a"),
])
def test_forward_errors(data, forward, kwargs, error, start):
    x, rm, rv = data
    out = np.full_like(x, 7)
    with pytest.raises(error) as info:
        forward(x, running_mean=rm, running_var=rv, out=out, **kwargs)
    assert str(info.value).startswith(start)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    np.testing.assert_array_equal(out, 7)


@pytest.mark.parametrize("backward", [fastbn.batch_norm_backward, reference.batch_norm_backward])
@pytest.mark.parametrize("kwargs, error, start", [
    (dict(activation="relu"), ValueError, "y: expected the forward's output"),
    (dict(y="y"), ValueError, "y: expected None without an activation"),
    (dict(activation="relu", y="short"), ValueError, "y: expected the shape of x"),
    (dict(residual=1), TypeError, "residual: expected a bool"),
    (dict(activation="gelu", y="y"), ValueError, "activation: expected None or 'relu'"),
])
def test_backward_errors(data, backward, kwargs, error, start):
    x = data[0]
    y, mean, invstd = fastbn.batch_norm_forward(x, activation="relu")
    kwargs = {k: {"y": y, "short": y[:2]}.get(v, v) if isinstance(v, str) and k == "y" else v
              for k, v in kwargs.items()}
    with pytest.raises(error) as info:
        backward(x, x, mean, invstd, **kwargs)
    assert str(info.value).startswith(start)


def test_stages_take_the_epilogue(data, rng):
    x = data[0]
    r = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, activation="relu", residual=r)
    c = stages.forward_coefficients(stages.moments(x), dtype=np.float32)
    np.testing.assert_array_equal(stages.apply(x, c, activation="relu", residual=r), y)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y)
    sums = stages.backward_sums(dy, x, mean, y=y)
    np.testing.assert_array_equal(stages.parameter_gradients(sums, invstd, dtype=np.float32)[1], db)
    bc = stages.backward_coefficients(sums, mean, invstd, dtype=np.float32)
    np.testing.assert_array_equal(stages.backward_apply(dy, x, bc, y=y), dx)
    with pytest.raises(ValueError, match="^activation: expected"):
        stages.apply(x, c, activation="Relu")

"""Empty batches (a dimension of size 0) in the NumPy functional API and the reference.

Semantics (fastbn/_api.py's module docstring), mirroring torch.nn.functional.batch_norm
on CPU tensors: ``y``/``dx`` empty, running statistics untouched, ``dweight``/``dbias``
zero; batch statistics of no values are NaN (torch leaves them uninitialized), eval
returns the running ones.  Every value here is exact (no arithmetic, or the same
float64 formula on both sides), so comparisons are exact.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import LAYOUTS, to_layout

#: NCHW shapes: empty batch, empty spatial extent, no channels.
EMPTY_SHAPES = [(0, 3, 2), (2, 3, 0), (0, 3), (2, 0, 4)]


def _channels(shape, layout):
    return shape[1] if layout == "NCHW" else shape[-1]


def _running(channels, dtype):
    return np.linspace(-0.5, 0.5, channels).astype(dtype), np.linspace(0.5, 2.0, channels).astype(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape_nchw", EMPTY_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_forward_backward_and_stats_match_reference(layout, shape_nchw, training):
    dtype = np.float32
    shape = to_layout(shape_nchw, layout)
    channels = _channels(shape, layout)
    x, dy = np.empty(shape, dtype), np.empty(shape, dtype)
    weight, bias = np.full(channels, 2.0, dtype), np.full(channels, 0.5, dtype)
    results = {}
    for module in (fastbn, reference):
        running_mean, running_var = _running(channels, dtype)
        y, mean, invstd = module.batch_norm_forward(
            x, weight, bias, running_mean=running_mean, running_var=running_var, training=training,
            layout=layout)
        dx, dweight, dbias = module.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                                        layout=layout)
        batch_mean, batch_var = module.batch_stats(x, layout=layout)
        expected_mean, expected_var = _running(channels, dtype)
        np.testing.assert_array_equal(running_mean, expected_mean)  # untouched
        np.testing.assert_array_equal(running_var, expected_var)
        assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
        assert mean.shape == invstd.shape == batch_mean.shape == batch_var.shape == (channels,)
        assert np.isnan(batch_mean).all() and np.isnan(batch_var).all()
        if training:
            assert np.isnan(mean).all() and np.isnan(invstd).all()
        else:
            np.testing.assert_array_equal(mean, expected_mean.astype(np.float64))
        np.testing.assert_array_equal(dweight, np.zeros(channels))
        np.testing.assert_array_equal(dbias, np.zeros(channels))
        assert dweight.dtype == dbias.dtype == (dtype if module is fastbn else np.float64)
        results[module] = (mean, invstd)
    for a, e in zip(results[fastbn], results[reference]):
        np.testing.assert_array_equal(a, e)  # NaN where NaN; eval: the same float64 invstd


def test_out_is_returned_and_functional_order():
    x = np.empty((0, 3), np.float64)
    out = np.empty_like(x)
    y, _, _ = fastbn.batch_norm_forward(x, out=out)
    assert y is out
    dx, _, _ = fastbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3), out=out)
    assert dx is out
    running_mean, running_var = _running(3, np.float64)
    assert fastbn.batch_norm(x, running_mean, running_var, training=True).shape == (0, 3)
    np.testing.assert_array_equal(running_mean, _running(3, np.float64)[0])


def test_empty_input_still_validates_every_argument_and_mutates_nothing():
    x = np.empty((0, 3, 2), np.float32)
    running_mean, running_var = _running(3, np.float32)
    with pytest.raises(ValueError, match=r"^weight: expected shape \(3,\)"):
        fastbn.batch_norm_forward(x, np.ones(4, np.float32), running_mean=running_mean,
                                  running_var=running_var)
    with pytest.raises(ValueError, match="^momentum:"):
        fastbn.batch_norm_forward(x, running_mean=running_mean, running_var=running_var, momentum=2.0)
    with pytest.raises(TypeError, match="^x: expected dtype"):
        fastbn.batch_norm_forward(np.empty((0, 3), np.int32))
    with pytest.raises(ValueError, match="^running_mean, running_var: expected running statistics"):
        fastbn.batch_norm_forward(x, training=False)
    with pytest.raises(ValueError, match=r"^dy: expected the shape of x"):
        fastbn.batch_norm_backward(np.empty((0, 3, 1), np.float32), x, np.zeros(3), np.ones(3))
    np.testing.assert_array_equal(running_mean, _running(3, np.float32)[0])
    np.testing.assert_array_equal(running_var, _running(3, np.float32)[1])


@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_functional(training):
    torch = pytest.importorskip("torch")
    x = torch.empty(0, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.full((3,), 0.5, dtype=torch.float64, requires_grad=True)
    running = [torch.from_numpy(a) for a in _running(3, np.float64)]
    y = torch.nn.functional.batch_norm(x, *running, weight, bias, training, 0.1, 1e-5)
    y.sum().backward()
    ours_running = _running(3, np.float64)
    ours_y, mean, invstd = fastbn.batch_norm_forward(
        x.detach().numpy(), weight.detach().numpy(), bias.detach().numpy(), running_mean=ours_running[0],
        running_var=ours_running[1], training=training)
    dx, dweight, dbias = fastbn.batch_norm_backward(np.ones_like(ours_y), x.detach().numpy(), mean, invstd,
                                                    weight.detach().numpy(), training=training)
    assert ours_y.shape == tuple(y.shape) and dx.shape == tuple(x.grad.shape)
    for ours, theirs in zip(ours_running, running):
        np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(dweight, weight.grad.numpy())
    np.testing.assert_array_equal(dbias, bias.grad.numpy())

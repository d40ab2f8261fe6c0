"""fastbn.BatchNorm, the NumPy layer: bad input raises and leaves the layer as it was;
state_dict round trips, copies and casts, with torch.nn.BatchNorm's keys."""

import numpy as np
import pytest

import fastbn

from _layers_helpers import C, SHAPE_NCHW, assert_same_state, layer_state, make_input, random_affine


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        fastbn.BatchNorm(C).backward(np.ones(SHAPE_NCHW, np.float32))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_features": 0}, ValueError, "num_features"),
    ({"num_features": 2.0}, ValueError, "num_features"),
    ({"num_features": 3, "eps": 0.0}, ValueError, "eps"),
    ({"num_features": 3, "momentum": 1.5}, ValueError, "momentum"),
    ({"num_features": 3, "layout": "NDHWC"}, ValueError, "layout"),
    ({"num_features": 3, "dtype": np.int16}, TypeError, "dtype"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastbn.BatchNorm(**kwargs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bad_input, error, match", [
    (np.ones((6, 4, 4, 5)), ValueError, "expected 3 channels on axis 1"),
    (np.ones((6, 3, 4, 5), np.float32), TypeError, "x: expected dtype float64"),
    (np.ones(3), ValueError, "rank"),
])
def test_forward_errors_leave_state_unchanged(rng, training, bad_input, error, match):
    layer = fastbn.BatchNorm(C, dtype=np.float64)
    layer(make_input(rng))
    layer.train(training)
    before = layer_state(layer)
    with pytest.raises(error, match=match):
        layer(bad_input)
    assert_same_state(before, layer)


def test_single_sample_needs_eval_mode(rng):
    layer = fastbn.BatchNorm(C, dtype=np.float64)
    layer(make_input(rng))
    before = layer_state(layer)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones((1, C)))
    assert_same_state(before, layer)
    np.testing.assert_allclose(layer.eval()(np.ones((1, C))),
                               (1 - layer.running_mean) / np.sqrt(layer.running_var + layer.eps)[None],
                               rtol=1e-14)


def test_backward_errors(rng):
    layer = fastbn.BatchNorm(C, dtype=np.float64)
    x = make_input(rng)
    layer(x)
    layer.backward(np.ones_like(x))
    grads = layer.grad_weight, layer.grad_bias
    with pytest.raises(ValueError, match="dy: expected the shape of x"):
        layer.backward(np.ones((6, 3, 4, 4)))
    with pytest.raises(TypeError, match="dy: expected the dtype of x"):
        layer.backward(np.ones(x.shape, np.float32))
    assert (layer.grad_weight, layer.grad_bias) == grads


# --------------------------------------------------------------------------- state


def test_state_dict_round_trip_and_copies(rng):
    trained = random_affine(fastbn.BatchNorm(C, momentum=None, dtype=np.float64), rng)
    for _ in range(3):
        trained(make_input(rng))
    state = trained.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"].shape == () and state["num_batches_tracked"].dtype == np.int64
    state["running_mean"][...] = 99.0  # a copy: the layer is unaffected
    assert not np.any(trained.running_mean == 99.0)

    fresh = fastbn.BatchNorm(C, momentum=None, dtype=np.float64)
    source = trained.state_dict()
    fresh.load_state_dict(source)
    source["weight"][...] = -1.0  # loading copies too
    for key, value in trained.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value)
    x = make_input(rng)
    np.testing.assert_array_equal(fresh.eval()(x), trained.eval()(x))


def test_load_state_dict_casts_to_layer_dtype(rng):
    source = fastbn.BatchNorm(C, dtype=np.float64)
    source(make_input(rng))
    layer = fastbn.BatchNorm(C, dtype=np.float32)
    layer.load_state_dict(source.state_dict())
    assert layer.running_var.dtype == np.float32
    np.testing.assert_array_equal(layer.running_var, source.running_var.astype(np.float32))


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("running_var"), r"missing key\(s\) \['running_var'\]"),
    (lambda s: s.update(extra=np.zeros(3)), r"unexpected key\(s\) \['extra'\]"),
    (lambda s: s.update(weight=np.ones(4)), r"state_dict\['weight'\]: expected shape \(3,\), got \(4,\)"),
    (lambda s: s.update(bias=np.ones((3, 1))), r"state_dict\['bias'\]: expected shape \(3,\)"),
    (lambda s: s.update(num_batches_tracked=np.array([2])), "num_batches_tracked"),
    (lambda s: s.update(num_batches_tracked=-1), "num_batches_tracked"),
    (lambda s: s.update(num_batches_tracked=2.5), "num_batches_tracked"),
])
def test_load_state_dict_errors_leave_state_unchanged(rng, edit, match):
    layer = fastbn.BatchNorm(C, dtype=np.float64)
    layer(make_input(rng))
    state = layer.state_dict()
    state["weight"][...] = 7.0  # would show if anything were loaded before the error
    edit(state)
    before = layer_state(layer)
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(state)
    assert_same_state(before, layer)


def test_state_dict_keys_follow_flags():
    assert list(fastbn.BatchNorm(C, affine=False, track_running_stats=False).state_dict()) == []
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['running_mean'"):
        fastbn.BatchNorm(C, track_running_stats=False).load_state_dict(
            fastbn.BatchNorm(C).state_dict())

"""fastbn.BatchNorm, the NumPy layer: against fastbn.reference and (when installed) torch.

The layer only sequences calls to the public functions, so its outputs are compared
with the float64 reference under the same per-element bounds as the core tests
(:func:`conftest.elementwise_atol`); its own logic (mode, momentum, counters, state)
is checked exactly.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import elementwise_atol, stats_rtol, to_layout

SHAPE_NCHW = (6, 3, 4, 5)
#: Child Pythons import this checkout's fastbn, wherever pytest was started.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(fastbn.__file__))}
C = SHAPE_NCHW[1]


def make_input(rng, layout="NCHW", dtype=np.float64, shape_nchw=SHAPE_NCHW):
    return (2.0 + 3.0 * rng.standard_normal(to_layout(shape_nchw, layout))).astype(dtype)


def random_affine(layer, rng):
    layer.weight[...] = rng.uniform(0.5, 2.0, C)
    layer.bias[...] = rng.standard_normal(C)
    return layer


def assert_close(actual, expected, dtype):
    atol = elementwise_atol(dtype, max(1.0, np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def layer_state(layer):
    """Everything an exception must leave untouched."""
    return ({k: v.copy() for k, v in layer.state_dict().items()}, layer._saved, layer.training)


def assert_same_state(before, layer):
    state, saved, training = before
    after_state, after_saved, after_training = layer_state(layer)
    assert state.keys() == after_state.keys()
    for key in state:
        np.testing.assert_array_equal(after_state[key], state[key])
    assert after_saved is saved and after_training == training


# --------------------------------------------------------------------------- passes


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


# --------------------------------------------------------------------------- errors


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        fastbn.BatchNorm(C).backward(np.ones(SHAPE_NCHW, np.float32))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_features": 0}, ValueError, "num_features"),
    ({"num_features": 2.0}, ValueError, "num_features"),
    ({"num_features": 3, "eps": 0.0}, ValueError, "eps"),
    ({"num_features": 3, "momentum": 1.5}, ValueError, "momentum"),
    ({"num_features": 3, "layout": "NDHWC"}, ValueError, "layout"),
    ({"num_features": 3, "dtype": np.float16}, TypeError, "dtype"),
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


def test_import_fastbn_does_not_import_torch():
    code = "import sys, fastbn, fastbn.layers; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=CHILD_ENV)
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------- torch


def test_matches_torch_batchnorm2d_training_and_state(rng):
    """Same batches through torch.nn.BatchNorm2d and fastbn.BatchNorm: same outputs,
    gradients and state_dict; a torch state loads as is (as NumPy arrays)."""
    torch = pytest.importorskip("torch")
    torch_bn = torch.nn.BatchNorm2d(C, momentum=None).double()
    layer = fastbn.BatchNorm(C, momentum=None, dtype=np.float64)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 2.0)
        torch_bn.bias.normal_()
    layer.load_state_dict({k: v.numpy() for k, v in torch_bn.state_dict().items()})
    for training in (True, True, False):
        torch_bn.train(training)
        layer.train(training)
        x = make_input(rng)
        dy = rng.standard_normal(x.shape)
        x_torch = torch.from_numpy(x.copy()).requires_grad_()
        y_torch = torch_bn(x_torch)
        y_torch.backward(torch.from_numpy(dy))
        # float64 both sides, different summation orders over 120 values: ~1e-14.
        np.testing.assert_allclose(layer(x), y_torch.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(layer.backward(dy), x_torch.grad.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(layer.grad_weight, torch_bn.weight.grad.numpy(), rtol=0, atol=1e-11)
        np.testing.assert_allclose(layer.grad_bias, torch_bn.bias.grad.numpy(), rtol=0, atol=1e-11)
        torch_bn.zero_grad()
        torch_state = torch_bn.state_dict()
        state = layer.state_dict()
        assert list(state) == list(torch_state)
        for key, value in torch_state.items():
            np.testing.assert_allclose(state[key], value.numpy(), rtol=1e-13)
    # And back: fastbn's state loads into torch unchanged.
    reloaded = torch.nn.BatchNorm2d(C).double()
    reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    assert int(reloaded.num_batches_tracked) == layer.num_batches_tracked == 2


# --------------------------------------------------------------------------- device


def test_device_arrays_in_cuda_simulator():
    """The layer on device arrays (Numba's CUDA simulator: the CUDA backend's kernels run
    on the CPU) gives the host layer's results, and placement survives state loading."""
    code = """
import numpy as np, fastbn
from numba import cuda
rng = np.random.default_rng(0)
x, dy = rng.standard_normal((8, 3, 2, 2)), rng.standard_normal((8, 3, 2, 2))
host = fastbn.BatchNorm(3, momentum=None, dtype=np.float64)
device = fastbn.BatchNorm(3, momentum=None, dtype=np.float64).to_device()
assert not isinstance(device.running_var, np.ndarray)
for training in (True, False):
    host.train(training), device.train(training)
    y, dx = host(x), host.backward(dy)
    y_device, dx_device = device(cuda.to_device(x)), device.backward(cuda.to_device(dy))
    # float64 on both sides, different reduction orders over 32 values.
    assert np.allclose(y_device.copy_to_host(), y, rtol=0, atol=1e-13), training
    assert np.allclose(dx_device.copy_to_host(), dx, rtol=0, atol=1e-13), training
    assert np.allclose(device.grad_weight.copy_to_host(), host.grad_weight, rtol=0, atol=1e-12)
    for key, value in device.state_dict().items():  # host copies
        assert isinstance(value, np.ndarray) and np.allclose(value, host.state_dict()[key], rtol=1e-13), key
expected = host.state_dict()
device.load_state_dict(expected)
assert not isinstance(device.running_var, np.ndarray)
device.cpu()
assert isinstance(device.running_var, np.ndarray) and device._saved is None
for key, value in device.state_dict().items():
    assert np.array_equal(value, expected[key]), key
print("ok")
"""
    env = {**CHILD_ENV, "NUMBA_ENABLE_CUDASIM": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_digits_example_runs(tmp_path):
    """examples/digits_batchnorm.py, one epoch: prints both networks' accuracy, writes the PNG."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "examples", "digits_batchnorm.py")
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, example, "--epochs", "1", "--out", str(out)],
                            capture_output=True, text=True, env=CHILD_ENV)
    assert result.returncode == 0, result.stderr
    first_epoch = result.stdout.splitlines()[2].split()
    assert first_epoch[0] == "1" and all(0.0 <= float(acc) <= 1.0 for acc in first_epoch[1:3])
    assert out.read_bytes().startswith(b"\x89PNG")

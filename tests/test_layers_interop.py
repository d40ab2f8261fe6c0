"""fastbn.BatchNorm, the NumPy layer, with the rest of the world: torch stays unimported,
torch.nn.BatchNorm2d gives the same results and state (when installed), and the digits
example built on the layer runs.  Device arrays: ``test_layers_device.py``."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn

from _layers_helpers import C, CHILD_ENV, make_input


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


# --------------------------------------------------------------------------- example
# (device arrays: test_layers_device.py, in the CUDA simulator run of test_cuda.py)


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

"""fastbn.BatchNorm, the NumPy layer, on CUDA device arrays: the host layer's results, and
placement that survives state loading.

Runs on a GPU, or on Numba's CUDA simulator (the CUDA backend's kernels run on the
CPU) in the simulator run ``tests/test_cuda.py`` starts when this process has no GPU.
Skipped when numba.cuda can run neither.
"""

import numba
import numpy as np
import pytest
from numba import cuda

if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import fastbn  # noqa: E402


def test_device_layer_matches_host_layer_and_keeps_placement():
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((8, 3, 2, 2)), rng.standard_normal((8, 3, 2, 2))
    host = fastbn.BatchNorm(3, momentum=None, dtype=np.float64)
    device = fastbn.BatchNorm(3, momentum=None, dtype=np.float64).to_device()
    assert not isinstance(device.running_var, np.ndarray)
    for training in (True, False):
        host.train(training)
        device.train(training)
        y, dx = host(x), host.backward(dy)
        y_device, dx_device = device(cuda.to_device(x)), device.backward(cuda.to_device(dy))
        # float64 on both sides, different reduction orders over 32 values.
        np.testing.assert_allclose(y_device.copy_to_host(), y, rtol=0, atol=1e-13)
        np.testing.assert_allclose(dx_device.copy_to_host(), dx, rtol=0, atol=1e-13)
        np.testing.assert_allclose(device.grad_weight.copy_to_host(), host.grad_weight, rtol=0, atol=1e-12)
        for key, value in device.state_dict().items():  # host copies
            assert isinstance(value, np.ndarray), key
            np.testing.assert_allclose(value, host.state_dict()[key], rtol=1e-13, err_msg=key)
    expected = host.state_dict()
    device.load_state_dict(expected)
    assert not isinstance(device.running_var, np.ndarray)
    device.cpu()
    assert isinstance(device.running_var, np.ndarray) and device._saved is None
    for key, value in device.state_dict().items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)

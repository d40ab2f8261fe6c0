"""Virtual batches with CUDA device arrays: refused with a TypeError naming
virtual_batch_size (they run on the CPU), before anything is written; eval, where
virtual_batch_size has no effect, runs as usual."""

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import fastbn  # noqa: E402


def test_training_with_device_arrays_is_refused():
    x = cuda.to_device(np.arange(24, dtype=np.float32).reshape(4, 3, 2))
    running_mean = cuda.to_device(np.zeros(3, np.float32))
    running_var = cuda.to_device(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="^virtual_batch_size: expected NumPy arrays"):
        fastbn.batch_norm_forward(x, running_mean=running_mean, running_var=running_var, virtual_batch_size=2)
    np.testing.assert_array_equal(running_mean.copy_to_host(), 0.0)
    stats = cuda.to_device(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="^virtual_batch_size: expected NumPy arrays"):
        fastbn.batch_norm_backward(x, x, stats, stats, virtual_batch_size=2)


def test_eval_with_device_arrays_ignores_virtual_batch_size():
    host = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    running_mean, running_var = np.full(3, 2.0, np.float32), np.full(3, 4.0, np.float32)
    y = fastbn.batch_norm_forward(cuda.to_device(host), running_mean=cuda.to_device(running_mean),
                                  running_var=cuda.to_device(running_var), training=False,
                                  virtual_batch_size=2)[0]
    expected = fastbn.batch_norm_forward(host, running_mean=running_mean, running_var=running_var,
                                         training=False)[0]
    np.testing.assert_allclose(y.copy_to_host(), expected, rtol=1e-6)

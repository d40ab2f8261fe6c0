"""Layer, group and instance norm with CUDA device arrays: not implemented on the GPU
yet, so every public function refuses them with a TypeError naming the argument (never
a silent host round trip, never a Numba traceback), before anything is written."""

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import fastbn  # noqa: E402


@pytest.mark.parametrize("call", [
    lambda x, v: fastbn.layer_norm(x, 3),
    lambda x, v: fastbn.group_norm(x, 2),
    lambda x, v: fastbn.group_norm_backward(x, x, 2, v, v),
    lambda x, v: fastbn.instance_norm(x),
])
def test_device_arrays_are_refused(call):
    x = cuda.to_device(np.ones((2, 4, 3), np.float32))
    v = cuda.to_device(np.ones((2, 2)))
    with pytest.raises(TypeError, match=r"^(x|dy): expected a numpy.ndarray .*CPU only"):
        call(x, v)


def test_host_array_with_device_weight_is_refused():
    with pytest.raises(TypeError, match="^weight: expected a numpy.ndarray"):
        fastbn.group_norm(np.ones((2, 4, 3), np.float32), 2, cuda.to_device(np.ones(4, np.float32)))

"""The CUDA backend's forward and backward against the float64 NumPy reference.

Runs on a GPU, or on Numba's CUDA simulator (see :mod:`_cuda_checks` for the tiny
launch configurations that make tiny shapes take every path)."""

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from _cuda_checks import (FLOAT_DTYPES, LAYOUTS, MANY_BLOCKS, ONE_WARP, SHAPES, check_backward,  # noqa: E402
                          check_forward, device, host, make_case, stats_rtol)

import fastbn  # noqa: E402
from fastbn import reference  # noqa: E402
from fastbn.cuda import launch_config  # noqa: E402

# Tiny tensors are a poor fit for a GPU; numba says so on every launch.
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_match_reference(rng, layout, dtype, training, shape):
    case = make_case(rng, shape, layout, dtype)
    config = ONE_WARP if SIMULATOR else {}
    with launch_config.override(**config):
        _, save_mean, save_invstd = check_forward(case, layout, training, momentum=0.3)
        check_backward(case, layout, training, save_mean, save_invstd)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multi_block_merges_match_reference(rng, layout, dtype):
    """Many blocks per channel, two warps per block: every merge stage runs."""
    case = make_case(rng, (3, 4, 5, 6), layout, dtype)
    with launch_config.override(**MANY_BLOCKS):
        mean, var = fastbn.batch_stats(device(case["x"]), layout=layout)
        mean_ref, var_ref = reference.batch_stats(case["x"], layout=layout)
        rtol = stats_rtol(case["x"], layout)
        np.testing.assert_allclose(host(mean), mean_ref, rtol=rtol)
        np.testing.assert_allclose(host(var), var_ref, rtol=rtol)
        _, save_mean, save_invstd = check_forward(case, layout, training=True)
        check_backward(case, layout, True, save_mean, save_invstd)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_offset_data_keeps_variance(rng, layout):
    """x = 1e4 + randn in float32: float64 accumulation keeps the variance, and the
    centered evaluation of y keeps y (x * a + b would lose ~1e4 * eps32 ~ 1e-3)."""
    case = make_case(rng, (3, 4, 5, 6), layout, np.float32, offset=1e4)
    with launch_config.override(**ONE_WARP):
        _, save_mean, save_invstd = check_forward(case, layout, training=True, use_affine=False)
        check_backward(case, layout, True, save_mean, save_invstd, use_weight=False)


@pytest.mark.parametrize("shape_nchw", [(6, 5), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_2_and_5(rng, layout, shape_nchw):
    case = make_case(rng, shape_nchw, layout, np.float64)
    with launch_config.override(**ONE_WARP):
        _, save_mean, save_invstd = check_forward(case, layout, training=True)
        check_backward(case, layout, True, save_mean, save_invstd)


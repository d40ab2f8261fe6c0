"""The CUDA backend on every memory order: channels-last bytes run without a copy,
other strides are copied through, ``out`` may be the input."""

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from _cuda_checks import (LAYOUTS, ONE_WARP, device, elementwise_atol, host, make_case,  # noqa: E402
                          stats_rtol)

import fastbn  # noqa: E402
from fastbn import reference  # noqa: E402
from fastbn.cuda import launch_config  # noqa: E402
from fastbn.cuda.arrays import strided_view  # noqa: E402
from fastbn.geometry import dense_strides  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


def channels_last_view_of_nchw(x_nchw):
    """A device array with x's NCHW shape whose bytes are channel-last (torch channels_last)."""
    x_nhwc = np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1))
    buffer = cuda.to_device(x_nhwc.reshape(-1))
    strides = dense_strides(x_nchw.shape, x_nchw.dtype.itemsize, (0, 2, 3, 1))
    return strided_view(buffer, x_nchw.shape, strides)


def test_channels_last_memory_runs_without_copy_and_keeps_its_order(rng):
    x = (2 + rng.standard_normal((3, 4, 5, 6))).astype(np.float32)
    d_x = channels_last_view_of_nchw(x)
    with launch_config.override(**ONE_WARP):
        y, save_mean, save_invstd = fastbn.batch_norm_forward(d_x, layout="NCHW")
        dx, _, _ = fastbn.batch_norm_backward(d_x, d_x, save_mean, save_invstd, layout="NCHW")
    y_ref, _, invstd_ref = reference.batch_norm_forward(x, layout="NCHW")
    assert y.strides == d_x.strides  # allocated in the order the kernels ran in
    magnitude = np.max(np.abs(y_ref))
    np.testing.assert_allclose(host(y), y_ref, rtol=0, atol=elementwise_atol(np.float32, magnitude, y_ref)
                               + stats_rtol(x, "NCHW") * magnitude)
    dx_ref, _, _ = reference.batch_norm_backward(x, x, host(save_mean), host(save_invstd))
    assert dx.strides == d_x.strides
    # dy = x: dx ~ 0 up to rounding of terms of size |w invstd x|.
    np.testing.assert_allclose(host(dx), dx_ref, rtol=0,
                               atol=8 * np.finfo(np.float32).eps * np.max(np.abs(x)) * np.max(invstd_ref))


def test_non_dense_input_and_out_are_copied_through(rng):
    """A strided input is copied once into kernel order; a strided ``out`` is filled."""
    full = (1 + rng.standard_normal((3, 4, 5, 12))).astype(np.float64)
    d_full = cuda.to_device(full)
    d_x = d_full[:, :, :, ::2]
    x = full[:, :, :, ::2]
    d_out_full = cuda.to_device(np.zeros_like(full))
    d_out = d_out_full[:, :, :, 1::2]
    with launch_config.override(**ONE_WARP):
        y, _, _ = fastbn.batch_norm_forward(d_x, layout="NCHW", out=d_out)
    assert y is d_out
    y_ref, _, _ = reference.batch_norm_forward(x, layout="NCHW")
    written = host(d_out_full)
    np.testing.assert_allclose(written[:, :, :, 1::2], y_ref, rtol=0, atol=64 * np.finfo(np.float64).eps)
    np.testing.assert_array_equal(written[:, :, :, ::2], 0)  # nothing outside out touched
    np.testing.assert_array_equal(host(d_full), full)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_may_be_the_input(rng, layout):
    case = make_case(rng, (3, 4, 5, 6), layout, np.float32)
    x = case["x"]
    y_ref, _, _ = reference.batch_norm_forward(x, layout=layout)
    d_x = device(x)
    with launch_config.override(**ONE_WARP):
        y, _, _ = fastbn.batch_norm_forward(d_x, layout=layout, out=d_x)
    assert y is d_x
    magnitude = np.max(np.abs(y_ref))
    np.testing.assert_allclose(host(d_x), y_ref, rtol=0,
                               atol=elementwise_atol(np.float32, magnitude, y_ref) + stats_rtol(x, layout) * magnitude)


def test_batch_norm_and_batch_stats_return_device_arrays(rng):
    case = make_case(rng, (3, 4, 5, 6), "NCHW", np.float16)
    d_rm, d_rv = device(case["running_mean"]), device(case["running_var"])
    with launch_config.override(**ONE_WARP):
        y = fastbn.batch_norm(device(case["x"]), d_rm, d_rv, training=False)
        mean, var = fastbn.batch_stats(device(case["x"]))
    assert cuda.devicearray.is_cuda_ndarray(y) and y.dtype == np.float16
    assert mean.dtype == var.dtype == np.float32
    y_ref = reference.batch_norm(case["x"], case["running_mean"], case["running_var"], training=False) \
        if hasattr(reference, "batch_norm") else reference.batch_norm_forward(
            case["x"], running_mean=case["running_mean"], running_var=case["running_var"],
            training=False)[0]
    magnitude = np.max(np.abs(y_ref.astype(np.float64)))
    assert np.all(np.abs(host(y).astype(np.float64) - y_ref) <= elementwise_atol(np.float16, magnitude, y_ref))


"""The CUDA backend's stages: device moments against the CPU's, merges of device
statistics, and the public stages composing to what batch_norm_forward/backward return.

Runs where tests/cuda runs (a GPU, or Numba's CUDA simulator); shapes are tiny and the
launch configuration small so that every merge path runs (see _cuda_checks.py).
"""

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import fastbn  # noqa: E402
from fastbn import stages  # noqa: E402
from fastbn.cuda import launch_config  # noqa: E402
from fastbn.dtypes import numpy_dtype  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

LAYOUTS = ("NCHW", "NHWC")
#: Several blocks per channel and two warps per block: every merge stage runs.
MANY_BLOCKS = dict(threads_per_block=64, max_blocks=64, values_per_block=40)
#: One warp per block, few blocks: the fewest simulated threads, for tests of composition.
ONE_WARP = dict(threads_per_block=32, max_blocks=4, values_per_block=1 << 20)
SHAPE_NCHW = (3, 4, 5, 6)
#: float64 statistics of ~100 values in another summation order: a few hundred float64
#: roundoffs of the spread (the data's mean is 3, its std 1).
STATS_RTOL = 1e-12


def _shape(layout):
    n, c, h, w = SHAPE_NCHW
    return SHAPE_NCHW if layout == "NCHW" else (n, h, w, c)


def _data(rng, layout, dtype, offset=3.0):
    return (offset + rng.standard_normal(_shape(layout))).astype(dtype)


def _host(values):
    return [v.copy_to_host() for v in values]


def _assert_moments_close(got, want):
    count, mean, m2 = got
    np.testing.assert_array_equal(count, want[0])
    np.testing.assert_allclose(mean, want[1], rtol=STATS_RTOL)
    np.testing.assert_allclose(m2, want[2], rtol=STATS_RTOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_device_moments_match_cpu(rng, layout, dtype):
    x = _data(rng, layout, dtype)
    with launch_config.override(**MANY_BLOCKS):
        m = fastbn.moments(cuda.to_device(x), layout=layout)
    assert all(cuda.devicearray.is_cuda_ndarray(v) and v.dtype == np.float64 for v in m)
    _assert_moments_close(_host(m), fastbn.moments(x, layout=layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_device_moments_of_slices_equal_one_shot(rng, layout):
    x = cuda.to_device(_data(rng, layout, np.float32))
    with launch_config.override(**ONE_WARP):
        whole = fastbn.moments(x, layout=layout)
        merged = fastbn.moments(x[:1], layout=layout).merge(fastbn.moments(x[1:], layout=layout))
    assert all(cuda.devicearray.is_cuda_ndarray(v) for v in merged)
    _assert_moments_close(_host(merged), _host(whole))
    var, invstd = merged.var.copy_to_host(), merged.invstd(1e-5).copy_to_host()
    count, _, m2 = _host(merged)
    np.testing.assert_allclose(var, m2 / count, rtol=1e-15)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(m2 / count + 1e-5), rtol=1e-15)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_device_backward_sums_of_slices_equal_one_shot(rng, layout):
    x, dy = _data(rng, layout, np.float64), _data(rng, layout, np.float64, offset=0.0)
    axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
    mean = x.mean(axis=axes)
    d_x, d_dy, d_mean = cuda.to_device(x), cuda.to_device(dy), cuda.to_device(mean)
    with launch_config.override(**ONE_WARP):
        whole = stages.backward_sums(d_dy, d_x, d_mean, layout=layout)
        merged = stages.backward_sums(d_dy[:2], d_x[:2], d_mean, layout=layout).merge(
            stages.backward_sums(d_dy[2:], d_x[2:], d_mean, layout=layout))
    count, sum_dy, sum_dy_xmu = _host(merged)
    want = _host(whole)
    np.testing.assert_array_equal(count, want[0])
    np.testing.assert_array_equal(count, x.size // x.shape[1 if layout == "NCHW" else -1])
    centered = x - mean.reshape((1, -1, 1, 1) if layout == "NCHW" else -1)
    # Sums of ~100 float64 terms in another order: a few hundred roundoffs of sum |term|.
    assert np.all(np.abs(sum_dy - want[1]) <= STATS_RTOL * np.abs(dy).sum(axis=axes))
    assert np.all(np.abs(sum_dy_xmu - want[2]) <= STATS_RTOL * np.abs(dy * centered).sum(axis=axes))


#: float16 and float32 in both layouts; bfloat16 (without ml_dtypes, float16 again) on rows.
STAGE_CASES = [(layout, dtype) for dtype in (np.float16, np.float32) for layout in LAYOUTS] + [
    ("NHWC", (numpy_dtype("bfloat16") or np.dtype(np.float16)).type)]


@pytest.mark.parametrize("layout, dtype", STAGE_CASES, ids=[f"{lay}-{np.dtype(d).name}" for lay, d in STAGE_CASES])
def test_public_stages_reproduce_forward_and_backward(rng, layout, dtype):
    """The stages fastbn.batch_norm_forward/backward are built from give bitwise their results."""
    channels = SHAPE_NCHW[1]
    x, dy = _data(rng, layout, dtype), _data(rng, layout, dtype, offset=0.0)
    weight = (1 + 0.5 * rng.standard_normal(channels)).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    running = (rng.standard_normal(channels).astype(np.float32), (0.5 + rng.random(channels)).astype(np.float32))
    d_x, d_dy, d_w, d_b = (cuda.to_device(a) for a in (x, dy, weight, bias))
    rm_api, rv_api, rm_stages, rv_stages = (cuda.to_device(a) for a in running * 2)
    with launch_config.override(**ONE_WARP):
        y, save_mean, save_invstd = fastbn.batch_norm_forward(
            d_x, d_w, d_b, running_mean=rm_api, running_var=rv_api, momentum=0.3, eps=1e-3, layout=layout)
        dx, dweight, dbias = fastbn.batch_norm_backward(d_dy, d_x, save_mean, save_invstd, d_w, layout=layout)

        m = stages.moments(d_x, layout=layout)
        fc = stages.forward_coefficients(m, d_w, d_b, dtype=dtype, eps=1e-3, running_mean=rm_stages,
                                         running_var=rv_stages, momentum=0.3)
        y_stages = stages.apply(d_x, fc, layout=layout)
        sums = stages.backward_sums(d_dy, d_x, fc.mean, layout=layout)
        bc = stages.backward_coefficients(sums, fc.mean, fc.invstd, d_w, dtype=dtype)
        dx_stages = stages.backward_apply(d_dy, d_x, bc, layout=layout)
        dweight_stages, dbias_stages = stages.parameter_gradients(sums, fc.invstd, dtype=dtype)

        eval_y = fastbn.batch_norm_forward(d_x, d_w, d_b, running_mean=rm_api, running_var=rv_api,
                                           training=False, layout=layout)[0]
        eval_fc = stages.forward_coefficients((rm_stages, rv_stages), d_w, d_b, dtype=dtype)
        eval_y_stages = stages.apply(d_x, eval_fc, layout=layout)

    for got, want in [(y_stages, y), (fc.mean, save_mean), (fc.invstd, save_invstd), (rm_stages, rm_api),
                      (rv_stages, rv_api), (dx_stages, dx), (dweight_stages, dweight), (dbias_stages, dbias),
                      (eval_y_stages, eval_y)]:
        assert cuda.devicearray.is_cuda_ndarray(got) and got.dtype == want.dtype
        np.testing.assert_array_equal(got.copy_to_host(), want.copy_to_host())
    np.testing.assert_array_equal(x, d_x.copy_to_host())  # inputs untouched

"""Fused epilogues on the CUDA backend (a GPU, or Numba's CUDA simulator): forward
``relu(bn(x) + residual)`` in the apply launch (training and the one-launch eval) and
the masked backward with the residual's gradient, against the CPU kernels (themselves
tested against the float64 reference in tests/test_epilogue_*.py).

Tolerance: float32 results from other summation orders of float64 statistics differ by
a few float32 ulps of the values (``8 * eps32 * max|value|``, as test_cuda_stages.py);
the residual's gradient is a selection of dy, compared exactly.  bfloat16 storage runs
the same kernels; its results are compared with the CPU's float32 run on the same
(bfloat16) values, within one bfloat16 spacing plus the float32 accumulation of its
statistics and sums (``4 n u32`` relative, n = 30 values per channel, far below it).
"""

import numba
import numpy as np
import pytest
from numba import cuda

if not (bool(numba.config.ENABLE_CUDASIM) or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import fastbn  # noqa: E402
from fastbn import stages  # noqa: E402
from fastbn.cuda import launch_config  # noqa: E402
from fastbn.dtypes import numpy_dtype  # noqa: E402
from _cuda_checks import storage_spacing  # noqa: E402

BFLOAT16 = numpy_dtype("bfloat16")

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

ONE_WARP = dict(threads_per_block=32, max_blocks=4, values_per_block=1 << 20)


def _close(actual, expected):
    atol = 8 * np.finfo(np.float32).eps * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def _data(rng, layout):
    shape = (3, 4, 5, 2) if layout == "NCHW" else (3, 5, 2, 4)
    x = (rng.standard_normal(shape) + 3).astype(np.float32)
    residual = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight, bias = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    return x, residual, dy, weight, bias


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_backward_match_the_cpu(rng, layout, training):
    x, residual, dy, weight, bias = _data(rng, layout)
    rm, rv = np.full(4, 3.0, np.float32), np.ones(4, np.float32)
    kwargs = dict(training=training, layout=layout, activation="relu")
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm.copy(), running_var=rv.copy(),
                                                residual=residual, **kwargs)
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, y=y, residual=True, **kwargs)
    d = {name: cuda.to_device(a) for name, a in
         dict(x=x, r=residual, dy=dy, w=weight, b=bias, rm=rm, rv=rv).items()}
    with launch_config.override(**ONE_WARP):
        d_y, d_mean, d_invstd = fastbn.batch_norm_forward(d["x"], d["w"], d["b"], running_mean=d["rm"],
                                                          running_var=d["rv"], residual=d["r"], **kwargs)
        d_grads = fastbn.batch_norm_backward(d["dy"], d["x"], d_mean, d_invstd, d["w"], y=d_y, residual=True,
                                             **kwargs)
    _close(d_y.copy_to_host(), y)
    assert (d_y.copy_to_host() >= 0).all()
    for got, want in zip(d_grads[:3], grads[:3]):
        _close(got.copy_to_host(), want)
    np.testing.assert_array_equal(d_grads[3].copy_to_host(), np.where(y <= 0, 0, dy))


def test_stage_apply_with_x_as_the_residual(rng):
    x, _, _, weight, bias = _data(rng, "NCHW")
    c = stages.forward_coefficients(stages.moments(x), weight, bias, dtype=np.float32)
    expected = stages.apply(x, c, activation="relu", residual=x)
    d_x = cuda.to_device(x)
    with launch_config.override(**ONE_WARP):
        d_c = stages.forward_coefficients(stages.moments(d_x), cuda.to_device(weight), cuda.to_device(bias),
                                          dtype=np.float32)
        got = stages.apply(d_x, d_c, activation="relu", residual=d_x)
    _close(got.copy_to_host(), expected)


@pytest.mark.skipif(BFLOAT16 is None, reason="bfloat16 needs ml_dtypes")
def test_bfloat16_epilogue_matches_the_cpu_on_the_same_values(rng):
    x, residual, dy, weight, bias = _data(rng, "NHWC")
    x, residual, dy = (a.astype(BFLOAT16) for a in (x, residual, dy))
    kwargs = dict(layout="NHWC", activation="relu")
    x32, r32, dy32 = (a.astype(np.float32) for a in (x, residual, dy))
    y, mean, invstd = fastbn.batch_norm_forward(x32, weight, bias, residual=r32, **kwargs)
    dx, _, _, _ = fastbn.batch_norm_backward(dy32, x32, mean, invstd, weight, y=y, residual=True, **kwargs)
    d = {name: cuda.to_device(a) for name, a in dict(x=x, r=residual, dy=dy, w=weight, b=bias).items()}
    with launch_config.override(**ONE_WARP):
        d_y, d_mean, d_invstd = fastbn.batch_norm_forward(d["x"], d["w"], d["b"], residual=d["r"], **kwargs)
        d_grads = fastbn.batch_norm_backward(d["dy"], d["x"], d_mean, d_invstd, d["w"], y=d_y, residual=True,
                                             **kwargs)
    got_y = d_y.copy_to_host()
    assert got_y.dtype == d_grads[0].dtype == d_grads[3].dtype == BFLOAT16
    for got, want in ((got_y, y), (d_grads[0].copy_to_host(), dx)):
        slack = storage_spacing(want, BFLOAT16) + 8 * np.finfo(np.float32).eps * np.abs(want).max()
        assert np.all(np.abs(got.astype(np.float64) - want) <= slack)
    np.testing.assert_array_equal(d_grads[3].copy_to_host(), np.where(got_y <= 0, 0, dy))

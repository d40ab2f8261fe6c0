"""The CUDA backend against the float64 NumPy reference.

Runs on a GPU, or on Numba's CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1`` was set
before numba was imported (``tests/test_cuda.py`` starts such a run in a subprocess
when this process has no GPU).  Skipped when numba.cuda can run neither.

The simulator runs every thread as a Python thread, so shapes here are tiny and the
launch configuration is forced small (32- or 64-thread blocks, few values per block,
few blocks) so that the tiny shapes still take every path: several blocks per
channel with their partials merged by a second kernel, several warps per block,
grid-stride elementwise loops.  On a GPU the same tests run plus larger shapes.
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
from fastbn import reference  # noqa: E402
from fastbn._checks import values_per_channel  # noqa: E402
from fastbn.cuda import launch_config  # noqa: E402
from fastbn.cuda.arrays import strided_view  # noqa: E402
from fastbn.geometry import dense_strides  # noqa: E402

# Tiny tensors are a poor fit for a GPU; numba says so on every launch.
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
LAYOUTS = ("NCHW", "NHWC")
#: Small geometry: one warp per block, 4 blocks at most (so the elementwise kernels
#: loop grid-stride and each channel is reduced by one block).
ONE_WARP = dict(threads_per_block=32, max_blocks=4, values_per_block=1 << 20)
#: Multi-block geometry: two warps per block (the cross-warp merge), 40 values per
#: reduction block: on (3, 4, 5, 6) NCHW reduces each channel's 90 values in 3
#: blocks, NHWC each channel's 60 rows in 12 blocks of 5 rows (8 row lanes).
MANY_BLOCKS = dict(threads_per_block=64, max_blocks=64, values_per_block=40)
SHAPES = [(3, 4, 5, 6)] if SIMULATOR else [(3, 4, 5, 6), (8, 16, 17, 19), (2, 3, 64, 64), (64, 40)]


# --------------------------------------------------------------------------- helpers

def param_dtype(dtype):
    """weight / bias / running statistics dtype: float32 for float16 input."""
    return np.float32 if dtype == np.float16 else dtype


def accumulator_eps(dtype):
    """Unit roundoff-scale of the sums: float32 for float16 input, float64 otherwise."""
    return np.finfo(np.float32 if dtype == np.float16 else np.float64).eps


def stats_rtol(x, layout):
    """Relative bound on mean (relative to |mean| + std), var and invstd of ``x``.

    Per thread, recursive summation of n terms shifted by one of the thread's values
    errs by <= n u of the sum of their magnitudes (Higham 4.3); with the shift a data
    value, at most z std from the mean (z = max |x - mean| / std), those magnitudes
    are <= (1 + z**2) times the variance term: 4 n u (1 + z**2) with n >= 16.  Chan
    merges see each partial mean with an absolute error u |mean|, which moves M2 by
    2 |delta| w u |mean| per merge (w = n_a n_b / n); summed over a merge tree of
    depth <= 16 (Cauchy-Schwarz, sum of w <= 16 n) that is <= 8 u |mean| / std
    relative.  u: the accumulator's unit roundoff (float32 for float16 input).  The
    same bound covers invstd (half the relative error of var, plus two roundings).
    """
    dtype = x.dtype.type
    axes = tuple(a for a in range(x.ndim) if a != (1 if layout == "NCHW" else x.ndim - 1))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    std = x64.std(axis=axes, keepdims=True)
    z = np.max(np.abs(x64 - mean) / std)
    u = accumulator_eps(dtype) / 2
    n = values_per_channel(x.shape, layout)
    return u * (4 * max(n, 16) * (1 + z * z) + 8 * np.max(np.abs(mean) / std))


def elementwise_atol(dtype, magnitude, reference_value):
    """Bound on |fastbn - reference| for y or dx, elementwise.

    The kernels evaluate ``(x - center) * scale + shift`` (dx: one more product and
    sum) in the compute dtype (float32 for float16 and float32, float64 for float64)
    from coefficients rounded once from the accumulator: at most 8 roundings of an
    operand no larger than ``magnitude`` (the largest |term| of the result), i.e.
    <= 4 eps * magnitude.  float16 results are then rounded to float16, as is the
    reference's float64 result: the two may land on neighbouring float16 values, one
    float16 spacing of the result apart.
    """
    compute = np.float32 if dtype == np.float16 else dtype
    atol = 4 * np.finfo(compute).eps * magnitude
    if dtype == np.float16:
        atol = atol + np.spacing(np.abs(reference_value).astype(np.float16)).astype(np.float64)
    return atol


def host(a):
    return a.copy_to_host()


def device(a):
    return None if a is None else cuda.to_device(a)


def make_case(rng, shape_nchw, layout, dtype, offset=3.0):
    """x (offset + randn) in ``layout``, dy, and float parameters of the right dtype."""
    shape = shape_nchw if layout == "NCHW" or len(shape_nchw) == 2 else (
        shape_nchw[0], *shape_nchw[2:], shape_nchw[1])
    channels = shape_nchw[1]
    pdt = param_dtype(dtype)
    return dict(
        x=(offset + rng.standard_normal(shape)).astype(dtype),
        dy=rng.standard_normal(shape).astype(dtype),
        weight=(1 + 0.5 * rng.standard_normal(channels)).astype(pdt),
        bias=rng.standard_normal(channels).astype(pdt),
        running_mean=rng.standard_normal(channels).astype(pdt),
        running_var=(0.5 + rng.random(channels)).astype(pdt),
    )


def per_channel(v, ndim, layout):
    shape = [1] * ndim
    shape[1 if layout == "NCHW" else ndim - 1] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def check_forward(case, layout, training, momentum=0.1, eps=1e-5, use_affine=True):
    """Run fastbn's forward on the device and the reference on the host; compare all outputs.

    Returns the device outputs (y, save_mean, save_invstd).
    """
    x, dtype = case["x"], case["x"].dtype.type
    weight = case["weight"] if use_affine else None
    bias = case["bias"] if use_affine else None
    d_rm, d_rv = device(case["running_mean"]), device(case["running_var"])
    d_x = device(x)
    y, save_mean, save_invstd = fastbn.batch_norm_forward(
        d_x, device(weight), device(bias), running_mean=d_rm, running_var=d_rv, training=training,
        momentum=momentum, eps=eps, layout=layout)
    rm_ref, rv_ref = case["running_mean"].copy(), case["running_var"].copy()
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(
        x, weight, bias, running_mean=rm_ref, running_var=rv_ref, training=training,
        momentum=momentum, eps=eps, layout=layout)

    stat_dtype = np.float32 if dtype == np.float16 else np.float64
    assert cuda.devicearray.is_cuda_ndarray(y) and y.shape == x.shape and y.dtype == x.dtype
    assert save_mean.dtype == save_invstd.dtype == stat_dtype
    assert save_mean.shape == (x.shape[1 if layout == "NCHW" else -1],)
    np.testing.assert_array_equal(host(d_x), x)  # input untouched

    rtol = stats_rtol(x, layout)
    if training:
        std = 1 / invstd_ref
        assert np.all(np.abs(host(save_mean) - mean_ref) <= rtol * (np.abs(mean_ref) + std))
        np.testing.assert_allclose(host(save_invstd), invstd_ref, rtol=rtol)
    else:  # eval: the running statistics, rounded once into the statistics dtype
        np.testing.assert_allclose(host(save_mean), mean_ref, rtol=np.finfo(stat_dtype).eps)
        np.testing.assert_allclose(host(save_invstd), invstd_ref, rtol=4 * np.finfo(stat_dtype).eps)
    # Running statistics: the update in the accumulator, rounded once into param dtype.
    running_rtol = np.finfo(param_dtype(dtype)).eps + rtol
    np.testing.assert_allclose(host(d_rm), rm_ref, rtol=running_rtol, atol=running_rtol)
    np.testing.assert_allclose(host(d_rv), rv_ref, rtol=running_rtol)

    scale = invstd_ref * (1 if weight is None else weight.astype(np.float64))
    shift = 0 if bias is None else per_channel(bias, x.ndim, layout)
    centered = np.abs(x.astype(np.float64) - per_channel(mean_ref, x.ndim, layout))
    magnitude = np.max(centered * per_channel(np.abs(scale), x.ndim, layout) + np.abs(shift))
    # Statistics errors move y by <= rtol * magnitude-scale on top of the rounding.
    atol = elementwise_atol(dtype, magnitude, y_ref) + rtol * magnitude
    assert np.all(np.abs(host(y).astype(np.float64) - y_ref.astype(np.float64)) <= atol)
    return y, save_mean, save_invstd


def check_backward(case, layout, training, save_mean, save_invstd, use_weight=True):
    """fastbn's backward on the device vs the reference given the same saved statistics."""
    x, dy, dtype = case["x"], case["dy"], case["x"].dtype.type
    weight = case["weight"] if use_weight else None
    d_dy, d_x = device(dy), device(x)
    dx, dweight, dbias = fastbn.batch_norm_backward(
        d_dy, d_x, save_mean, save_invstd, device(weight), training=training, layout=layout)
    mean, invstd = host(save_mean), host(save_invstd)
    dx_ref, dweight_ref, dbias_ref = reference.batch_norm_backward(
        dy, x, mean, invstd, weight, training=training, layout=layout)

    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dweight.dtype == dbias.dtype == param_dtype(dtype)
    np.testing.assert_array_equal(host(d_dy), dy)
    np.testing.assert_array_equal(host(d_x), x)

    n = values_per_channel(x.shape, layout)
    axes = tuple(a for a in range(x.ndim) if a != (1 if layout == "NCHW" else x.ndim - 1))
    x_hat = (x.astype(np.float64) - per_channel(mean, x.ndim, layout)) * per_channel(invstd, x.ndim, layout)
    dy64 = dy.astype(np.float64)
    # Sums of n terms in the accumulator (<= 4 n u of the sum of |terms|), then one
    # rounding into the parameter dtype.
    sum_rtol = 4 * max(n, 16) * accumulator_eps(dtype) / 2
    param_eps = np.finfo(param_dtype(dtype)).eps
    dbias_atol = sum_rtol * np.abs(dy64).sum(axis=axes) + param_eps * np.abs(dbias_ref)
    dweight_atol = sum_rtol * np.abs(dy64 * x_hat).sum(axis=axes) + param_eps * np.abs(dweight_ref)
    assert np.all(np.abs(host(dbias) - dbias_ref) <= dbias_atol)
    assert np.all(np.abs(host(dweight) - dweight_ref) <= dweight_atol)

    w_invstd = per_channel(np.abs(invstd * (1 if weight is None else weight.astype(np.float64))), x.ndim, layout)
    if training:
        magnitude = np.max(w_invstd * (np.abs(dy64) + per_channel(np.abs(dbias_ref) / n, x.ndim, layout)
                                       + np.abs(x_hat) * per_channel(np.abs(dweight_ref) / n, x.ndim, layout)))
        # dweight / dbias errors enter dx through the two 1/n terms.
        magnitude_of_sums = np.max(w_invstd * (per_channel(dbias_atol / n, x.ndim, layout)
                                               + np.abs(x_hat) * per_channel(dweight_atol / n, x.ndim, layout)))
    else:
        magnitude = np.max(w_invstd * np.abs(dy64))
        magnitude_of_sums = 0.0
    atol = elementwise_atol(dtype, magnitude, dx_ref) + magnitude_of_sums
    assert np.all(np.abs(host(dx).astype(np.float64) - dx_ref.astype(np.float64)) <= atol)
    return dx


# --------------------------------------------------------------------------- accuracy

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


# --------------------------------------------------------------------------- memory order, out

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


# --------------------------------------------------------------------------- dispatch and errors

def test_mixing_host_and_device_arrays_names_the_argument(rng):
    case = make_case(rng, (3, 4, 5, 6), "NCHW", np.float32)
    d_x = device(case["x"])
    with pytest.raises(TypeError, match=r"^weight: expected a CUDA device array like x"):
        fastbn.batch_norm_forward(d_x, case["weight"])
    with pytest.raises(TypeError, match=r"^running_var: expected a CUDA device array like x"):
        fastbn.batch_norm_forward(d_x, running_mean=device(case["running_mean"]),
                                  running_var=case["running_var"])
    with pytest.raises(TypeError, match=r"^save_mean: expected a CUDA device array like dy"):
        fastbn.batch_norm_backward(d_x, d_x, np.zeros(4), device(np.ones(4)))
    with pytest.raises(TypeError, match=r"^x: expected a CUDA device array like dy"):
        fastbn.batch_norm_backward(d_x, case["x"], device(np.zeros(4)), device(np.ones(4)))
    # A host x with a device out: the host side decides, out is named.
    with pytest.raises(TypeError, match=r"^out: expected a numpy.ndarray like x"):
        fastbn.batch_norm_forward(case["x"], out=d_x)


def test_float16_parameters_must_be_float32(rng):
    case = make_case(rng, (3, 4, 5, 6), "NCHW", np.float16)
    with pytest.raises(TypeError, match=r"^weight: expected dtype float32, got float16"):
        fastbn.batch_norm_forward(device(case["x"]), device(case["weight"].astype(np.float16)))
    with pytest.raises(TypeError, match=r"^save_mean: expected dtype float32 or float64, got float16"):
        fastbn.batch_norm_backward(device(case["dy"]), device(case["x"]),
                                   device(np.zeros(4, np.float16)), device(np.ones(4, np.float32)))


def test_float16_stays_refused_on_the_host(rng):
    with pytest.raises(TypeError, match=r"^x: expected dtype float32 or float64, got float16"):
        fastbn.batch_stats(np.ones((2, 3), dtype=np.float16))


def test_checks_run_before_any_device_work(rng):
    case = make_case(rng, (3, 4, 5, 6), "NCHW", np.float32)
    d_rm, d_rv = device(case["running_mean"]), device(case["running_var"])
    with pytest.raises(ValueError, match=r"^momentum: expected a number in \[0.0, 1.0\]"):
        fastbn.batch_norm_forward(device(case["x"]), running_mean=d_rm, running_var=d_rv, momentum=2.0)
    np.testing.assert_array_equal(host(d_rm), case["running_mean"])
    np.testing.assert_array_equal(host(d_rv), case["running_var"])


def test_unavailable_cuda_is_a_clear_error(monkeypatch, rng):
    import fastbn.cuda as backend
    monkeypatch.setattr(backend, "SIMULATOR", False)
    monkeypatch.setattr(backend._cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="numba.cuda cannot use a GPU"):
        fastbn.batch_stats(device(np.ones((2, 3))))


def test_launch_config_override_validates_and_restores():
    before = (launch_config.threads_per_block, launch_config.max_blocks, launch_config.values_per_block)
    with pytest.raises(ValueError, match="threads_per_block"):
        with launch_config.override(threads_per_block=48):
            pass
    with pytest.raises(TypeError, match="no field"):
        with launch_config.override(blocks=3):
            pass
    with launch_config.override(max_blocks=7):
        assert launch_config.max_blocks == 7
    assert (launch_config.threads_per_block, launch_config.max_blocks, launch_config.values_per_block) == before


def test_describe():
    description = fastbn.cuda.describe()
    if SIMULATOR:
        assert description == "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    else:
        assert isinstance(description, str) and "compute capability" in description

"""Layer, group and instance norm with CUDA device arrays (numba's simulator here, a GPU
where there is one): forward and backward on the device, against the float64 reference
of :mod:`fastbn.reference`, in both layouts; results are device arrays.  Shapes are tiny
(the simulator runs every thread as Python)."""

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
from fastbn.cuda import launch_config  # noqa: E402
from fastbn.dtypes import numpy_dtype  # noqa: E402
from _norms_helpers import assert_close_to_reference, channels_last  # noqa: E402

is_device = cuda.devicearray.is_cuda_ndarray


@pytest.fixture(autouse=True)
def one_warp_blocks():
    """Blocks of one warp: every kernel path is the same, and the simulator, which runs
    each thread as Python, is several times faster than with 256-thread blocks."""
    with launch_config.override(threads_per_block=32):
        yield


def _host(*arrays):
    return [a.copy_to_host() for a in arrays]


def _device(*arrays):
    return [None if a is None else cuda.to_device(a) for a in arrays]


def _offset(dtype):
    """1e4 for float32 (the stable statistics' case); none for float64, whose
    elementwise tolerance (a few ulps of |x|) a 1e4 offset's conditioning of dx exceeds."""
    return 1e4 if dtype == np.float32 else 0.0


@pytest.mark.parametrize("dtype, layout", [(np.float32, "NCHW"), (np.float32, "NHWC"), (np.float64, "NCHW")])
def test_group_norm_forward_backward(dtype, layout):
    rng = np.random.default_rng(3)
    x = (_offset(dtype) + rng.standard_normal((2, 4, 3, 2))).astype(dtype)
    x[1, 2:] = 7.0  # a constant group
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight, bias = rng.standard_normal((2, 4)).astype(dtype)
    if layout == "NHWC":
        x, dy = channels_last(x), channels_last(dy)
    args = dict(layout=layout)
    want = reference.group_norm_forward(x, 2, weight, bias, 1e-5, **args)
    got = fastbn.group_norm_forward(*_device(x), 2, *_device(weight, bias), 1e-5, **args)
    assert all(is_device(a) for a in got)
    assert_close_to_reference(_host(*got), want, dtype, 12)
    want_grads = reference.group_norm_backward(dy, x, 2, want[1], want[2], weight, **args)
    grads = fastbn.group_norm_backward(*_device(dy, x), 2, *got[1:], cuda.to_device(weight), **args)
    assert all(is_device(a) for a in grads)
    assert_close_to_reference(_host(*grads), want_grads, dtype, 12)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_instance_norm_running_statistics(layout):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 4)).astype(np.float32) * 3 + 2
    x[0, 1] = -1.5  # a constant instance
    if layout == "NHWC":
        x = channels_last(x)
    running = np.array([0.5, -1.0], np.float32), np.array([2.0, 0.25], np.float32)
    want_running = [r.copy() for r in running]
    want = reference.instance_norm(x, *want_running, momentum=0.3, layout=layout)
    device_running = _device(*running)
    y = fastbn.instance_norm(cuda.to_device(x), *device_running, momentum=0.3, layout=layout)
    assert is_device(y)
    assert_close_to_reference([y.copy_to_host()], [want], np.float32, 4)
    for got, expected in zip(_host(*device_running), want_running):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_forward_backward(dtype):
    rng = np.random.default_rng(5)
    x = (_offset(dtype) + rng.standard_normal((3, 2, 5))).astype(dtype)
    x[1, 0] = 2.0  # a constant row
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight, bias = rng.standard_normal((2, 5, 5)).astype(dtype)[:, 0]
    want = reference.layer_norm_forward(x, 5, weight, bias)
    got = fastbn.layer_norm_forward(*_device(x), 5, *_device(weight, bias))
    assert all(is_device(a) for a in got) and got[1].shape == (3, 2)
    assert_close_to_reference(_host(*got), want, dtype, 5)
    want_grads = reference.layer_norm_backward(dy, x, 5, want[1], want[2], weight)
    grads = fastbn.layer_norm_backward(*_device(dy, x), 5, *got[1:], cuda.to_device(weight))
    assert_close_to_reference(_host(*grads), want_grads, dtype, 6)


def test_layer_norm_two_axes_without_affine_into_out():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    want = reference.layer_norm_forward(x, (3, 4))
    out = cuda.device_array_like(x)
    got = fastbn.layer_norm_forward(cuda.to_device(x), (3, 4), out=out)
    assert got[0] is out
    assert_close_to_reference(_host(*got), want, np.float32, 12)
    want_grads = reference.layer_norm_backward(dy, x, (3, 4), want[1], want[2])
    grads = fastbn.layer_norm_backward(*_device(dy, x), (3, 4), *got[1:])
    assert_close_to_reference(_host(*grads), want_grads, np.float32, 12)


@pytest.mark.parametrize("shape, layout", [((3, 4), "NCHW"), ((2, 4, 2, 1, 3), "NHWC")])
def test_group_norm_other_ranks_into_out(shape, layout):
    """Rank 2 (one value per (n, c): S = 1) and rank 5 channel-last, written into
    ``out``; the inputs are left as they were."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape)
    if layout == "NHWC":
        x = channels_last(x)
    dy = rng.standard_normal(x.shape)
    weight = rng.standard_normal(4)
    xd, dyd = _device(x, dy)
    out = cuda.device_array_like(x)
    want = reference.group_norm_forward(x, 2, weight, None, layout=layout)
    got = fastbn.group_norm_forward(xd, 2, cuda.to_device(weight), layout=layout, out=out)
    assert got[0] is out
    assert_close_to_reference(_host(*got), want, np.float64, 2)
    dx_out = cuda.device_array_like(x)
    grads = fastbn.group_norm_backward(dyd, xd, 2, *got[1:], layout=layout, out=dx_out)
    assert grads[0] is dx_out
    want_grads = reference.group_norm_backward(dy, x, 2, want[1], want[2], layout=layout)
    # dx of a group of 2 values cancels terms of size |dy| * invstd down to a small
    # result: the bound is a few roundings of those terms, not of the result.
    terms = np.abs(dy).max() * want[2].max()
    np.testing.assert_allclose(grads[0].copy_to_host(), want_grads[0], rtol=0, atol=16 * np.finfo(float).eps * terms)
    for got_grad, want_grad in zip(_host(*grads[1:]), want_grads[1:]):
        np.testing.assert_allclose(got_grad, want_grad, rtol=0, atol=1e-13 * np.abs(want_grad).max())
    np.testing.assert_array_equal(xd.copy_to_host(), x)
    np.testing.assert_array_equal(dyd.copy_to_host(), dy)


#: Unit roundoff of the 16-bit storage formats: float16 keeps 11 significant bits,
#: bfloat16 8 (without ml_dtypes, which defines bfloat16, only float16 runs).
UNIT_ROUNDOFF = {np.dtype(np.float16): 2.0 ** -11}
if numpy_dtype("bfloat16") is not None:
    UNIT_ROUNDOFF[numpy_dtype("bfloat16")] = 2.0 ** -8


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=lambda d: d.name)
def test_16_bit_storage(dtype):
    """16-bit data computes in float32 with float32 parameters and saved statistics
    (fastbn.dtypes); compared with the float64 reference at the format's resolution u:
    results within 8 u (forward) and 16 u (backward) of their largest magnitude."""
    u = UNIT_ROUNDOFF[dtype]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 3, 2)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight, bias = rng.standard_normal((2, 4)).astype(np.float32)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    cases = [(fastbn.group_norm_forward, fastbn.group_norm_backward, reference.group_norm_forward,
              reference.group_norm_backward, 2, x, dy, x64, dy64),
             (fastbn.layer_norm_forward, fastbn.layer_norm_backward, reference.layer_norm_forward,
              reference.layer_norm_backward, 4, x.reshape(12, 4), dy.reshape(12, 4), x64.reshape(12, 4),
              dy64.reshape(12, 4))]
    for forward, backward, forward_ref, backward_ref, arg, xh, dyh, xr, dyr in cases:
        got = forward(cuda.to_device(xh), arg, *_device(weight, bias))
        assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == np.float32
        want = forward_ref(xr, arg, weight.astype(np.float64), bias.astype(np.float64))
        for a, b in zip(_host(*got), want):
            np.testing.assert_allclose(a.astype(np.float64), b, rtol=0, atol=8 * u * np.abs(b).max())
        grads = backward(*_device(dyh, xh), arg, *got[1:], cuda.to_device(weight))
        want = backward_ref(dyr, xr, arg, want[1], want[2], weight.astype(np.float64))
        for a, b in zip(_host(*grads), want):
            np.testing.assert_allclose(a.astype(np.float64), b, rtol=0, atol=16 * u * np.abs(b).max())


def test_host_array_with_device_weight_is_refused():
    with pytest.raises(TypeError, match="^weight: expected a numpy.ndarray"):
        fastbn.group_norm(np.ones((2, 4, 3), np.float32), 2, cuda.to_device(np.ones(4, np.float32)))


def test_bad_groups_on_device_name_the_argument():
    with pytest.raises(ValueError, match="^num_groups: expected a positive divisor"):
        fastbn.group_norm(cuda.to_device(np.ones((2, 4, 3), np.float32)), 3)

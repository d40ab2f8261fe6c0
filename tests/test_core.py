"""fastbn against the float64 reference: every layout, rank, dtype and argument combination."""

import itertools

import numba
import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import channel_axis, elementwise_atol, stats_rtol, to_layout

# Serial small-tensor kernels and the parallel planes/rows kernels (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")

SHAPES_NCHW = {2: (37, 5), 3: (4, 3, 19), 4: (3, 5, 6, 7), 5: (2, 3, 4, 3, 5)}
DTYPES = [np.float32, np.float64]


def make_case(rng, shape, layout, dtype, affine, running):
    """x, dy and per-channel arguments (None where absent), all in ``dtype``."""
    channels = shape[channel_axis(len(shape), layout)]
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(dtype) if affine else None
    bias = rng.standard_normal(channels).astype(dtype) if affine else None
    rm = rng.standard_normal(channels).astype(dtype) if running else None
    rv = rng.uniform(0.5, 2.0, channels).astype(dtype) if running else None
    return x, dy, weight, bias, rm, rv


def assert_forward_matches(x, weight, bias, rm, rv, training, layout, **kwargs):
    """Run fastbn and the reference (on float64 copies) and compare every output."""
    rm_ref = None if rm is None else rm.astype(np.float64)
    rv_ref = None if rv is None else rv.astype(np.float64)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(
        x.astype(np.float64), weight, bias, running_mean=rm_ref, running_var=rv_ref,
        training=training, layout=layout)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                                training=training, layout=layout, **kwargs)
    n = x.size // x.shape[channel_axis(x.ndim, layout)]
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.dtype == invstd.dtype == np.float64
    np.testing.assert_allclose(mean, mean_ref, rtol=stats_rtol(n), atol=0)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=stats_rtol(n), atol=0)
    bias_magnitude = 0.0 if bias is None else np.max(np.abs(bias))
    np.testing.assert_allclose(y, y_ref, rtol=0,
                               atol=elementwise_atol(x.dtype, np.max(np.abs(y_ref)) + bias_magnitude))
    if rm is not None and training:
        # One update r = (1 - m) r + m s computed in float64 from statistics that carry
        # stats_rtol(n), then rounded once to the dtype (eps / 2).
        rtol = np.finfo(x.dtype).eps + stats_rtol(n)
        np.testing.assert_allclose(rm, rm_ref, rtol=rtol, atol=np.finfo(x.dtype).eps)
        np.testing.assert_allclose(rv, rv_ref, rtol=rtol, atol=0)
    return y, mean, invstd


def assert_backward_matches(dy, x, mean, invstd, weight, training, layout, **kwargs):
    dx_ref, dweight_ref, dbias_ref = reference.batch_norm_backward(
        dy.astype(np.float64), x.astype(np.float64), mean, invstd, weight, training=training, layout=layout)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                                    layout=layout, **kwargs)
    assert dx.dtype == dweight.dtype == dbias.dtype == x.dtype
    # dx = dy*A + (x - mean)*B + C: its terms are each about max|dy * weight * invstd|.
    w_max = 1.0 if weight is None else np.max(np.abs(weight))
    term = np.max(np.abs(dy)) * w_max * np.max(invstd) * 3
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=elementwise_atol(x.dtype, term))
    # Per-channel sums: float64 accumulation (n u of the sum of magnitudes), then one
    # rounding to the dtype (eps/2 of the result).
    axes = tuple(a for a in range(x.ndim) if a != channel_axis(x.ndim, layout))
    n = x.size // x.shape[channel_axis(x.ndim, layout)]
    eps = np.finfo(x.dtype).eps
    abs_dy = np.abs(dy.astype(np.float64))
    x_hat = np.abs((x.astype(np.float64) - reference._per_channel(mean, x.ndim, layout))
                   * reference._per_channel(invstd, x.ndim, layout))
    np.testing.assert_array_less(np.abs(dbias - dbias_ref),
                                 eps * np.abs(dbias_ref) + stats_rtol(n) * abs_dy.sum(axis=axes) + 1e-300)
    np.testing.assert_array_less(np.abs(dweight - dweight_ref),
                                 eps * np.abs(dweight_ref) + stats_rtol(n) * (abs_dy * x_hat).sum(axis=axes)
                                 + 1e-300)
    return dx


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training, running", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_backward_match_reference(rng, layout, rank, dtype, training, running, affine):
    shape = to_layout(SHAPES_NCHW[rank], layout)
    x, dy, weight, bias, rm, rv = make_case(rng, shape, layout, dtype, affine, running)
    x_before, dy_before = x.copy(), dy.copy()
    _, mean, invstd = assert_forward_matches(x, weight, bias, rm, rv, training, layout)
    assert_backward_matches(dy, x, mean, invstd, weight, training, layout)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dy, dy_before)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_stats_match_reference(rng, layout, dtype):
    x = (5.0 + rng.standard_normal(to_layout((6, 7, 9, 11), layout))).astype(dtype)
    mean, var = fastbn.batch_stats(x, layout=layout)
    mean_ref, var_ref = reference.batch_stats(x, layout=layout)
    n = x.size // 7
    np.testing.assert_allclose(mean, mean_ref, rtol=stats_rtol(n))
    np.testing.assert_allclose(var, var_ref, rtol=stats_rtol(n))


def test_batch_norm_follows_torch_argument_order(rng):
    x, _, weight, bias, rm, rv = make_case(rng, (4, 3, 5), "NCHW", np.float64, True, True)
    y = fastbn.batch_norm(x, rm, rv, weight, bias)  # training=False by default, as F.batch_norm
    y_ref, _, _ = reference.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                               training=False)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=elementwise_atol(np.float64, 10))
    y_train = fastbn.batch_norm(x, rm, rv, weight, bias, True, 0.3, 1e-3)
    y_train_ref, _, _ = reference.batch_norm_forward(x, weight, bias, training=True, eps=1e-3)
    np.testing.assert_allclose(y_train, y_train_ref, rtol=0, atol=elementwise_atol(np.float64, 10))


@pytest.mark.parametrize("module", [fastbn, reference], ids=["fastbn", "reference"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_refuses_running_stats_positionally(rng, module, training):
    """F.batch_norm's order (x, running_mean, running_var, weight, bias) given to
    batch_norm_forward would read the running statistics as weight and bias and update
    weight and bias in place; the running statistics are keyword-only, so it raises
    before touching anything."""
    x, _, weight, bias, rm, rv = make_case(rng, (4, 3, 5), "NCHW", np.float64, True, True)
    arrays = (x, rm, rv, weight, bias)
    before = [a.copy() for a in arrays]
    with pytest.raises(TypeError, match="positional"):
        module.batch_norm_forward(x, rm, rv, weight, bias, training=training)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_positional_order_matches_forward_keywords(rng, training):
    """The same call in both documented orders: identical y and running statistics."""
    x, _, weight, bias, rm, rv = make_case(rng, (4, 3, 5, 6), "NCHW", np.float32, True, True)
    rm_a, rv_a, rm_b, rv_b = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y_a = fastbn.batch_norm(x, rm_a, rv_a, weight, bias, training, 0.3, 1e-3)
    y_b, _, _ = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm_b, running_var=rv_b,
                                          training=training, momentum=0.3, eps=1e-3)
    np.testing.assert_array_equal(y_a, y_b)
    np.testing.assert_array_equal(rm_a, rm_b)
    np.testing.assert_array_equal(rv_a, rv_b)
    if training:
        assert not np.array_equal(rm_a, rm)  # the running statistics were really passed


# ---------------------------------------------------------------------------- memory order

def strided_variants(x, layout):
    """``x``'s values in other memory orders: channel-swapped bytes, non-contiguous, reversed."""
    axis = channel_axis(x.ndim, layout)
    other_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, axis, -1 if axis == 1 else 1)),
                             -1 if axis == 1 else 1, axis)
    padded = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    padded[..., ::2] = x
    return {
        "other-order": other_last,
        "non-contiguous": padded[..., ::2],
        "negative-strides": np.ascontiguousarray(x[::-1, ..., ::-1])[::-1, ..., ::-1],
        "fortran": np.asfortranarray(x),
    }


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("variant", ["other-order", "non-contiguous", "negative-strides", "fortran"])
def test_any_strides_give_the_same_results(rng, layout, variant):
    shape = to_layout((4, 6, 5, 7), layout)
    x, dy, weight, bias, rm, rv = make_case(rng, shape, layout, np.float32, True, True)
    xs = strided_variants(x, layout)[variant]
    dys = strided_variants(dy, layout)[variant]
    assert np.array_equal(xs, x) and not (xs.flags.c_contiguous and variant != "other-order")
    _, mean, invstd = assert_forward_matches(xs, weight, bias, rm, rv, True, layout)
    assert_backward_matches(dys, xs, mean, invstd, weight, True, layout)


def test_channels_last_memory_keeps_its_order(rng):
    """An NCHW-shaped array with channel-last bytes (PyTorch channels_last) runs the
    NHWC kernels without a copy and returns y in the same memory order."""
    x = np.moveaxis(rng.standard_normal((4, 5, 6, 3)).astype(np.float32), -1, 1)
    y, _, _ = fastbn.batch_norm_forward(x)
    assert y.shape == x.shape and y.strides == x.strides


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("out_order", ["same", "other"])
def test_out_buffers_are_filled_and_returned(rng, layout, out_order):
    shape = to_layout((3, 4, 5, 6), layout)
    x, dy, weight, bias, _, _ = make_case(rng, shape, layout, np.float64, True, False)
    out = np.full_like(x, np.nan)
    if out_order == "other":
        out = strided_variants(out, layout)["other-order"]
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, layout=layout, out=out)
    assert y is out
    y_ref, _, _ = reference.batch_norm_forward(x, weight, bias, layout=layout)
    np.testing.assert_allclose(out, y_ref, rtol=0, atol=elementwise_atol(np.float64, 10))
    dx_out = np.full_like(out, np.nan)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout, out=dx_out)
    assert dx is dx_out
    dx_ref, _, _ = reference.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout)
    np.testing.assert_allclose(dx_out, dx_ref, rtol=0, atol=elementwise_atol(np.float64, 10))


# ---------------------------------------------------------------------------- work split

@pytest.mark.parametrize("shape_nchw, layout", [
    ((1, 1, 70000), "NCHW"),       # one plane, split into several blocks
    ((2, 3, 40000), "NCHW"),       # several blocks per plane
    ((5000, 3), "NHWC"),           # few channels: rows folded, with a tail
    ((7, 3000), "NHWC"),           # wide rows: several column blocks
    ((3, 5, 1, 1), "NCHW"),        # spatial size 1: runs as rows
])
def test_work_splits_merge_correctly(rng, shape_nchw, layout):
    shape = to_layout(shape_nchw, layout)
    x, dy, weight, bias, rm, rv = make_case(rng, shape, layout, np.float32, True, True)
    _, mean, invstd = assert_forward_matches(x, weight, bias, rm, rv, True, layout)
    assert_backward_matches(dy, x, mean, invstd, weight, True, layout)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_results_do_not_depend_on_thread_count(rng, layout):
    """The work partition and merge order are fixed, so results are bitwise identical."""
    x = (1e3 + rng.standard_normal(to_layout((8, 16, 40, 40), layout))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    saved = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            y, mean, invstd = fastbn.batch_norm_forward(x, layout=layout)
            results.append((y, mean, invstd, *fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout)))
    finally:
        numba.set_num_threads(saved)
    for first, second in itertools.pairwise(results):
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)


def test_dtypes_of_device_arrays_come_from_their_interface():
    """PyTorch CUDA tensors carry a torch dtype; the checks read the NumPy dtype from
    ``__cuda_array_interface__`` instead of failing on ``np.dtype(torch.float32)``."""
    from fastbn import _checks

    class TorchLikeTensor:
        dtype = "torch.float16"  # not a NumPy dtype name
        shape = (2, 3)
        __cuda_array_interface__ = {"typestr": "<f2", "shape": (2, 3), "data": (0, False), "version": 3}

    assert _checks.dtype_of(TorchLikeTensor()) == np.float16
    assert _checks.dtype_of(np.zeros(2, np.float32)) == np.float32
    with pytest.raises(TypeError, match="NumPy dtype"):
        _checks.dtype_of(type("Odd", (), {"dtype": "no such dtype"})())

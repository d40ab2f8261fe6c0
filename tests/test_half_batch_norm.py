"""Half precision on the CPU: float16 and bfloat16 (``ml_dtypes``) storage, float32 compute.

Accuracy is "within one rounding of the storage dtype of the float64 reference applied to
the same inputs": the reference runs in float64 on ``x.astype(float64)`` (and float64
copies of the float32 parameters), and every ``y``/``dx`` value must lie within half a
unit in the last place of the storage dtype at the reference value (the one rounding to
nearest of the store) plus the float32 error of the value rounded (:func:`_f32_error`).
Statistics, running statistics and parameter gradients are float32 and are compared with
float32 tolerances.

Shapes cover the one-call small-tensor path and the parallel plane and row kernels, in
both layouts; adversarial data are a large offset, constant channels and one value per
channel.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

EPS32 = float(np.finfo(np.float32).eps)
#: (shape in NCHW order, what runs): small ones take the one-call serial path (at most
#: fastbn.cpu.small.SMALL_SIZE = 131072 values), larger ones the parallel kernels: long
#: NCHW planes reduce and apply as planes; short planes reduce as rows; NHWC runs rows.
SHAPES = {"small": (3, 5, 4, 4), "planes": (6, 6, 64, 64), "short planes": (160, 8, 11, 11)}


def _storage(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(np.float16)


def _finfo(dtype):
    if dtype.name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def _half_ulp(values, dtype):
    """Half the spacing of ``dtype`` at ``|values|`` (float64): the error of one rounding
    to nearest.  Subnormals share the smallest normal binade's spacing."""
    info = _finfo(dtype)
    tiny = float(info.smallest_normal)
    binade = np.exp2(np.floor(np.log2(np.maximum(np.abs(values), tiny))))
    return 0.5 * binade * float(info.eps)


def _f32_error(magnitude):
    """Bound on the float32 arithmetic before the store: the kernels evaluate
    ``(x - center) * scale + shift`` (dx: one more product) in float32 from float32
    coefficients, at most ~6 roundings of 2**-24 each relative to an operand no larger
    than ``magnitude`` (elementwise sum of |terms|); 8 eps32 (16 units) covers them
    with margin, and is still ~500x below half a float16 ulp relative to ``magnitude``."""
    return 8 * EPS32 * magnitude


def _per_channel(v, ndim, layout):
    shape = [1] * ndim
    shape[1 if layout == "NCHW" else ndim - 1] = -1
    return np.asarray(v, np.float64).reshape(shape)


def _assert_one_rounding(got, expected, dtype, bound_f32):
    """``got`` (storage dtype) within half an ulp of ``expected`` (float64) plus ``bound_f32``."""
    assert got.dtype == dtype
    got64 = got.astype(np.float64)
    error = np.abs(got64 - expected)
    allowed = _half_ulp(expected, dtype) + bound_f32
    worst = np.argmax(error - allowed)
    assert np.all(error <= allowed), (f"{np.sum(error > allowed)} values beyond one rounding; worst got "
                                      f"{got64.flat[worst]}, reference {expected.flat[worst]}")


def _assert_within(got, expected, bound):
    error = np.abs(got.astype(np.float64) - expected)
    assert np.all(error <= bound), (error, bound)


def _layout_shape(shape, layout):
    return shape if layout == "NCHW" else (shape[0], *shape[2:], shape[1])


def _data(shape, layout, dtype, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    full = _layout_shape(shape, layout)
    x = (rng.standard_normal(full) * 2 + offset).astype(dtype)
    dy = rng.standard_normal(full).astype(dtype)
    c = shape[1]
    weight = rng.uniform(0.5, 2.0, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    return x, dy, weight, bias


def _check_training(x, dy, weight, bias, layout):
    """Training forward and backward against the float64 reference; returns fastbn's y."""
    dtype, c = x.dtype, weight.size
    running = [np.full(c, 0.5, np.float32), np.full(c, 2.0, np.float32)]
    ref_running = [r.astype(np.float64) for r in running]
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=running[0], running_var=running[1],
                                                layout=layout)
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    ref_y, ref_mean, ref_invstd = reference.batch_norm_forward(
        x64, w64, bias.astype(np.float64), running_mean=ref_running[0], running_var=ref_running[1], layout=layout)
    assert mean.dtype == invstd.dtype == np.float32
    np.testing.assert_allclose(mean, ref_mean, rtol=EPS32, atol=1e-12)
    np.testing.assert_allclose(invstd, ref_invstd, rtol=EPS32)
    for got, expected in zip(running, ref_running):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=2 * EPS32)
    nd = x.ndim
    x_hat = (x64 - _per_channel(ref_mean, nd, layout)) * _per_channel(ref_invstd, nd, layout)
    scale = _per_channel(ref_invstd * w64, nd, layout)
    magnitude = np.abs(x_hat) * _per_channel(w64, nd, layout) + np.abs(_per_channel(bias, nd, layout))
    _assert_one_rounding(y, ref_y, dtype, _f32_error(magnitude))

    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout)
    dy64 = dy.astype(np.float64)
    ref_dx, ref_dweight, ref_dbias = reference.batch_norm_backward(dy64, x64, ref_mean, ref_invstd, w64,
                                                                   layout=layout)
    axes = tuple(a for a in range(nd) if a != (1 if layout == "NCHW" else nd - 1))
    n = x.size // c
    mean_dy = _per_channel(ref_dbias / n, nd, layout)
    mean_dy_xhat = _per_channel(ref_dweight / n, nd, layout)
    magnitude = np.abs(scale) * (np.abs(dy64) + np.abs(mean_dy) + np.abs(x_hat) * np.abs(mean_dy_xhat))
    # fastbn differentiates around its float32 save_mean, ``delta`` from the exact mean:
    # that moves dx by about scale * invstd * delta * (|x_hat| |mean dy| + |mean dy x_hat|).
    delta = _per_channel(np.abs(mean.astype(np.float64) - ref_mean) * ref_invstd, nd, layout)
    _assert_one_rounding(dx, ref_dx, dtype, _f32_error(magnitude) + 2 * delta * magnitude)
    assert dweight.dtype == dbias.dtype == np.float32
    sum_abs_dy = np.abs(dy64).sum(axis=axes)
    # float32 results of float64 sums: one rounding, plus the float64 sums' own error
    # (n u64 of the sum of magnitudes, below 4 eps32 of it) and, for dweight, delta.
    _assert_within(dbias, ref_dbias, EPS32 * np.abs(ref_dbias) + 4 * EPS32 * sum_abs_dy)
    _assert_within(dweight, ref_dweight, EPS32 * np.abs(ref_dweight)
                   + 4 * EPS32 * np.abs(dy64 * x_hat).sum(axis=axes) + 2 * delta.ravel() * sum_abs_dy)
    return y


def _check_eval(x, dy, weight, bias, layout):
    """Eval forward and backward (running statistics as constants) against the reference."""
    c, nd = weight.size, x.ndim
    running_mean = np.linspace(-1, 1, c).astype(np.float32)
    running_var = np.linspace(0.5, 3, c).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=running_mean,
                                                running_var=running_var, training=False, layout=layout)
    x64, w64, b64 = x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64)
    ref_y, _, ref_invstd = reference.batch_norm_forward(
        x64, w64, b64, running_mean=running_mean.astype(np.float64), running_var=running_var.astype(np.float64),
        training=False, layout=layout)
    assert mean.dtype == invstd.dtype == np.float32
    scale = _per_channel(ref_invstd * w64, nd, layout)
    magnitude = np.abs(x64 - _per_channel(running_mean, nd, layout)) * np.abs(scale) \
        + np.abs(_per_channel(b64, nd, layout))
    _assert_one_rounding(y, ref_y, x.dtype, _f32_error(magnitude))
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, training=False, layout=layout)
    dy64 = dy.astype(np.float64)
    _assert_one_rounding(dx, dy64 * scale, x.dtype, _f32_error(np.abs(dy64 * scale)))


#: bfloat16 skips the parallel row kernels (NHWC beyond the small path): they differ from
#: float16's only in the widen/narrow specialization (tested bit for bit in test_half.py),
#: and compiling them costs ~20 s of CI time.
CASES = [(storage, layout, size) for storage in ("float16", "bfloat16") for layout in ("NCHW", "NHWC")
         for size in ("small", "planes") if (storage, layout, size) != ("bfloat16", "NHWC", "planes")]


@pytest.mark.parametrize("storage, layout, size", CASES)
def test_within_one_rounding_of_the_float64_reference(storage, layout, size):
    x, dy, weight, bias = _data(SHAPES[size], layout, _storage(storage))
    _check_training(x, dy, weight, bias, layout)
    _check_eval(x, dy, weight, bias, layout)


def test_short_planes_reduce_as_rows():
    x, dy, weight, bias = _data(SHAPES["short planes"], "NCHW", np.dtype(np.float16), seed=1)
    _check_training(x, dy, weight, bias, "NCHW")


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@pytest.mark.parametrize("size", ["small", "planes"])
def test_large_offset(storage, size):
    """1e3 + 2 randn: float16 keeps ~2 fractional bits there, bfloat16 none (values are
    multiples of 4); the reference sees the same quantized values, and the statistics must
    not lose the spread to the offset."""
    x, dy, weight, bias = _data(SHAPES[size], "NCHW", _storage(storage), seed=2, offset=1e3)
    _check_training(x, dy, weight, bias, "NCHW")


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_constant_channels_give_bias_and_nan_stays_in_its_channel(storage):
    dtype = _storage(storage)
    x, dy, weight, bias = _data(SHAPES["planes"], "NCHW", dtype, seed=3)
    x[:, 1] = dtype.type(3.0)
    x[:, 2] = dtype.type(-1e3)
    y = _check_training(x, dy, weight, bias, "NCHW")
    np.testing.assert_array_equal(y[:, 1:3].astype(np.float32),
                                  np.broadcast_to(bias[1:3, None, None].astype(dtype).astype(np.float32),
                                                  y[:, 1:3].shape))
    x[0, 4, 0, 0] = np.nan
    y, mean, _ = fastbn.batch_norm_forward(x, weight, bias)
    assert np.isnan(mean[4]) and np.all(np.isnan(y[:, 4].astype(np.float32)))
    assert not np.any(np.isnan(np.delete(y, 4, axis=1).astype(np.float32)))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_one_value_per_channel_and_two(layout):
    """Eval of a single sample per channel (rank 2 and 4), training on two values."""
    for shape in ((1, 7), (1, 7, 1, 1)):
        x, dy, weight, bias = _data(shape, layout, np.dtype(np.float16), seed=4)
        _check_eval(x, dy, weight, bias, layout)
    x, dy, weight, bias = _data((2, 7), layout, np.dtype(np.float16), seed=5)
    _check_training(x, dy, weight, bias, layout)


def test_batch_stats_and_empty_batches_use_float32_statistics():
    x = _data((4, 3, 5, 5), "NCHW", np.dtype(np.float16))[0]
    mean, var = fastbn.batch_stats(x)
    ref_mean, ref_var = reference.batch_stats(x.astype(np.float64))
    assert mean.dtype == var.dtype == np.float32
    np.testing.assert_allclose(mean, ref_mean, rtol=EPS32, atol=1e-12)
    np.testing.assert_allclose(var, ref_var, rtol=2 * EPS32)
    empty = np.zeros((0, 3), np.float16)
    y, mean, invstd = fastbn.batch_norm_forward(empty)
    assert y.dtype == np.float16 and mean.dtype == invstd.dtype == np.float32
    dx, dweight, dbias = fastbn.batch_norm_backward(empty, empty, mean, invstd)
    assert dx.dtype == np.float16 and dweight.dtype == dbias.dtype == np.float32


def test_stages_compose_to_the_one_call_path():
    """The stages API (float32 coefficients, float64 moments) gives the one-call small
    path's results bit for bit, as for float32."""
    x, dy, weight, bias = _data(SHAPES["small"], "NCHW", np.dtype(np.float16), seed=6)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias)
    coefficients = fastbn.stages.forward_coefficients(fastbn.stages.moments(x), weight, bias, dtype=x.dtype)
    np.testing.assert_array_equal(coefficients.mean, mean)
    np.testing.assert_array_equal(fastbn.stages.apply(x, coefficients).view(np.uint16), y.view(np.uint16))
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, weight)
    sums = fastbn.stages.backward_sums(dy, x, mean)
    backward = fastbn.stages.backward_coefficients(sums, mean, invstd, weight, dtype=x.dtype)
    np.testing.assert_array_equal(fastbn.stages.backward_apply(dy, x, backward).view(np.uint16), dx.view(np.uint16))


def test_residual_relu_epilogue_and_its_masked_backward():
    dtype = np.dtype(np.float16)
    x, dy, weight, bias = _data(SHAPES["small"], "NCHW", dtype, seed=7)
    residual = _data(SHAPES["small"], "NCHW", dtype, seed=8)[0]
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, activation="relu", residual=residual)
    x64 = x.astype(np.float64)
    ref_y, ref_mean, ref_invstd = reference.batch_norm_forward(
        x64, weight.astype(np.float64), bias.astype(np.float64), activation="relu",
        residual=residual.astype(np.float64))
    x_hat = (x64 - ref_mean[:, None, None]) * ref_invstd[:, None, None]
    magnitude = np.abs(x_hat) * weight[:, None, None] + np.abs(bias[:, None, None]) \
        + np.abs(residual.astype(np.float64))
    _assert_one_rounding(y, ref_y, dtype, _f32_error(magnitude))
    dx, _, _, dresidual = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, activation="relu", y=y,
                                                     residual=True)
    np.testing.assert_array_equal(dresidual.astype(np.float32), np.where(y > 0, dy, 0).astype(np.float32))
    plain_dx, _, _ = fastbn.batch_norm_backward(dresidual, x, mean, invstd, weight)
    np.testing.assert_array_equal(dx.view(np.uint16), plain_dx.view(np.uint16))


def test_layer_object_takes_half_storage_with_float32_state():
    layer = fastbn.BatchNorm(5, dtype=np.float16)
    assert layer.weight.dtype == layer.running_var.dtype == np.float32
    x, dy, _, _ = _data(SHAPES["small"], "NCHW", np.dtype(np.float16), seed=9)
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert y.dtype == dx.dtype == np.float16 and layer.grad_weight.dtype == np.float32
    expected, _, _ = fastbn.batch_norm_forward(x, np.ones(5, np.float32), np.zeros(5, np.float32))
    np.testing.assert_array_equal(y.view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("call, message", [
    (lambda x: fastbn.batch_norm_forward(x, np.ones(5, np.float16)), "weight: expected dtype float32, got float16"),
    (lambda x: fastbn.batch_norm_forward(x, running_mean=np.zeros(5), running_var=np.ones(5)),
     "running_mean: expected dtype float32, got float64"),
    (lambda x: fastbn.batch_norm_forward(x.view(np.int16)), "x: expected dtype float32 or float64"),
    (lambda x: fastbn.batch_norm_forward(x, out=np.empty(x.shape, np.float32)), "out: expected dtype float16"),
    (lambda x: fastbn.batch_norm_forward(x, virtual_batch_size=1), "x: expected dtype float32 or float64"),
    (lambda x: fastbn.group_norm_forward(x, 5), "x: expected dtype float32 or float64"),
    (lambda x: fastbn.layer_norm_forward(x, (4, 4)), "x: expected dtype float32 or float64"),
])
def test_errors_name_the_argument(call, message):
    x = _data(SHAPES["small"], "NCHW", np.dtype(np.float16))[0]
    with pytest.raises(TypeError, match=message.replace("(", r"\(")):
        call(x)


def test_cpu_float16_conversions_are_exact():
    """The CPU kernels' float16 conversions (fastbn.cpu.native_half: the CPU's own
    instructions where it has them, else fastbn.half's) match NumPy bit for bit: widening
    every bit pattern, narrowing every float16 value, the midpoints between neighbours
    (ties to even), the overflow and subnormal edges and random float32 values."""
    import numba

    from fastbn.cpu import native_half
    from fastbn.half import narrow, widen

    @numba.njit
    def convert(bits, values, widened, narrowed):
        for i in range(bits.size):
            widened[i] = widen(bits[i])
        for i in range(values.size):
            narrowed[i] = narrow(values[i], narrowed.dtype)

    bits = np.arange(1 << 16, dtype=np.uint16)
    halves = bits.view(np.float16).astype(np.float64)
    finite = np.sort(halves[np.isfinite(halves)])
    with np.errstate(over="ignore"):
        values = np.concatenate([finite, (finite[:-1] + finite[1:]) / 2, [65520.0, 1e6, 2.0 ** -25, -0.0]])
        values = np.concatenate([values.astype(np.float32),
                                 np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 1e3])
    widened, narrowed = np.empty(bits.size, np.float32), np.empty(values.size, np.uint16)
    convert(bits, values, widened, narrowed)
    nan = np.isnan(halves)
    np.testing.assert_array_equal(widened[~nan].view(np.uint32),
                                  bits.view(np.float16)[~nan].astype(np.float32).view(np.uint32))
    assert np.all(np.isnan(widened[nan]))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(narrowed, values.astype(np.float16).view(np.uint16))
    if native_half.NATIVE_FLOAT16:  # the hardware conversions were the ones compiled
        assert "fpext half" in convert.inspect_llvm(convert.signatures[0])


def test_bench_compares_storage_dtypes(monkeypatch):
    """``python -m fastbn bench --dtype float32 float16``: rows per dtype, 16-bit inputs
    with float32 parameters, half the bytes, and the side-by-side table (fastbn alone,
    no pauses: the plumbing, not the timings)."""
    from fastbn import bench, bench_report

    monkeypatch.setattr(bench_report, "IDLE_PAUSE_S", 0.0)
    monkeypatch.setattr(bench, "available_implementations", lambda: {"fastbn": bench.Fastbn})

    x, _, weight, _, running_mean, _ = bench.make_inputs((4, 8, 6, 6), "NCHW", np.float16)
    assert x.dtype == np.float16 and weight.dtype == running_mean.dtype == np.float32
    rows = list(bench_report.bench_rows([(4, 8, 6, 6)], ["NCHW"], ["forward_train"], [np.float32, np.float16],
                                        quick=True, with_reference=False, progress=lambda *args: None))
    assert [r["dtype"] for r in rows] == ["float32", "float16"]
    assert rows[1]["bytes"] * 2 == rows[0]["bytes"] and all(r["fastbn_s"] > 0 for r in rows)
    table = bench_report.format_dtype_table(rows, ["float32", "float16"])
    ratio = rows[1]["fastbn_s"] / rows[0]["fastbn_s"]
    assert "float16 GB/s" in table and f"{ratio:.2f}" in table.splitlines()[2]


def test_distributed_single_rank_equals_the_local_call():
    """fastbn.distributed composes the same CPU stages, so 16-bit storage works there too:
    one MPI rank gives the local call's results bit for bit."""
    MPI = pytest.importorskip("mpi4py.MPI")
    from fastbn import distributed

    x, dy, weight, bias = _data(SHAPES["small"], "NCHW", np.dtype(np.float16), seed=10)
    y, mean, invstd = distributed.batch_norm_forward(x, weight, bias, comm=MPI.COMM_SELF)
    expected = fastbn.batch_norm_forward(x, weight, bias)
    np.testing.assert_array_equal(y.view(np.uint16), expected[0].view(np.uint16))
    np.testing.assert_array_equal(mean, expected[1])
    dx, dweight, _ = distributed.batch_norm_backward(dy, x, mean, invstd, weight, comm=MPI.COMM_SELF)
    expected = fastbn.batch_norm_backward(dy, x, mean, invstd, weight)
    np.testing.assert_array_equal(dx.view(np.uint16), expected[0].view(np.uint16))
    np.testing.assert_array_equal(dweight, expected[1])

"""Hypothesis fuzzing of the public API against :mod:`fastbn.reference`.

Each example draws a shape (rank 2-5, small dims so the kernels' work splitting is
still exercised), a layout, a dtype, a memory arrangement for ``x`` (C order, channels
last/first transposes, Fortran order, a strided slice, a negative-stride view), which of
weight/bias/running stats are given, training or eval, and whether ``out`` is given
(fresh, in another memory order, or ``x``/``dy`` itself).  Valid calls are compared with
the float64 reference; invalid combinations must raise the documented ValueError.

Profiles (select with ``--hypothesis-profile`` or ``HYPOTHESIS_PROFILE``):
``fastbn-ci`` (default here, 40 examples per test) and ``fastbn-long`` (2000 examples)::

    HYPOTHESIS_PROFILE=fastbn-long python -m pytest -q tests/test_fuzz.py

Tolerances: ``y``/``dx`` are at most ~6 roundings in the input dtype of operands no
larger than the largest term (``magnitude``), so ``16 * eps * magnitude`` (2x margin).
Statistics are float64 on both sides with shifted sums: relative agreement ~n * 2**-53;
``1e-9`` relative to the data's scale covers every size drawn here.  ``dweight``/``dbias``
are float64 sums rounded once to the input dtype: ``4 * eps`` relative to the sum of
magnitudes.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbn
from fastbn import reference

# Serial small-tensor kernels and the parallel planes/rows kernels (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")

settings.register_profile("fastbn-ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fastbn-long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastbn-ci"))

MEMORY = ("c", "channels_other", "fortran", "strided", "negative")
OUT = ("none", "fresh", "fortran", "strided", "alias")


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    layout = draw(st.sampled_from(("NCHW", "NHWC")))
    channels = draw(st.integers(1, 9))
    batch = draw(st.integers(1, 5))
    spatial = [draw(st.integers(1, 6)) for _ in range(rank - 2)]
    shape = (batch, channels, *spatial) if layout == "NCHW" else (batch, *spatial, channels)
    return dict(
        shape=shape, layout=layout, channels=channels,
        dtype=draw(st.sampled_from((np.float32, np.float64))),
        memory=draw(st.sampled_from(MEMORY)),
        flip_axis=draw(st.integers(0, rank - 1)),
        weight=draw(st.booleans()), bias=draw(st.booleans()),
        running=draw(st.booleans()), training=draw(st.booleans()),
        out=draw(st.sampled_from(OUT)),
        momentum=draw(st.sampled_from((0.0, 0.1, 1.0))),
        eps=draw(st.sampled_from((1e-5, 1e-3, 1.0))),
        offset=draw(st.sampled_from((0.0, 3.0, -1e3))),
        scale=draw(st.sampled_from((1.0, 1e-3, 50.0))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def arrange(values, memory, flip_axis):
    """``values`` with the same logical content in another memory arrangement."""
    if memory == "c":
        return values.copy()
    if memory == "channels_other":  # channel axis moved in memory (NCHW <-> channels_last)
        perm = (0, *range(2, values.ndim), 1)
        return np.ascontiguousarray(values.transpose(perm)).transpose(np.argsort(perm))
    if memory == "fortran":
        return np.asfortranarray(values)
    if memory == "strided":
        big = np.zeros(values.shape[:-1] + (2 * values.shape[-1],), values.dtype)
        big[..., ::2] = values
        return big[..., ::2]
    flipped = np.flip(values, flip_axis).copy()
    return np.flip(flipped, flip_axis)  # negative stride along flip_axis


def make_out(case, like, inputs):
    kind = case["out"]
    if kind == "none":
        return None
    if kind == "alias":
        return inputs[0]
    zeros = np.full(like.shape, np.nan, like.dtype)  # NaN: an unwritten element shows
    if kind == "fresh":
        return zeros
    return arrange(zeros, "fortran" if kind == "fortran" else "strided", 0)


def atol(dtype, magnitude):
    return 16 * np.finfo(dtype).eps * max(float(magnitude), 1e-30)


def expected_error(case):
    n_per_channel = int(np.prod(case["shape"])) // case["channels"]
    if not case["training"] and not case["running"]:
        return "running_mean, running_var: expected running statistics"
    if case["training"] and n_per_channel < 2:
        return "Expected more than 1 value per channel when training"
    return None


def draw_inputs(case):
    rng = np.random.default_rng(case["seed"])
    dtype, c = case["dtype"], case["channels"]
    values = (case["offset"] + case["scale"] * rng.standard_normal(case["shape"])).astype(dtype)
    x = arrange(values, case["memory"], case["flip_axis"])
    weight = rng.uniform(0.5, 2.0, c).astype(dtype) if case["weight"] else None
    bias = rng.standard_normal(c).astype(dtype) if case["bias"] else None
    rm = rv = None
    if case["running"]:
        rm = (case["offset"] + rng.standard_normal(c)).astype(dtype)
        rv = rng.uniform(0.5, 2.0, c).astype(dtype) * dtype(case["scale"] ** 2)
    return x, weight, bias, rm, rv


def as64(a):
    return None if a is None else np.array(a, dtype=np.float64)


@given(cases())
def test_forward_matches_reference(case):
    x, weight, bias, rm, rv = draw_inputs(case)
    kwargs = dict(training=case["training"], momentum=case["momentum"], eps=case["eps"],
                  layout=case["layout"])
    x_before = x.copy()
    out = make_out(case, x, (x,))
    error = expected_error(case)
    if error:
        snapshot = None if rm is None else (rm.copy(), rv.copy())
        with pytest.raises(ValueError, match=error.split(":")[0]):
            fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv, out=out, **kwargs)
        if snapshot is not None:
            np.testing.assert_array_equal(rm, snapshot[0])
            np.testing.assert_array_equal(rv, snapshot[1])
        return

    rm64, rv64 = as64(rm), as64(rv)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(
        x_before.astype(np.float64), as64(weight), as64(bias), running_mean=rm64, running_var=rv64,
        **kwargs)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv, out=out, **kwargs)

    if out is not None:
        assert y is out
    if case["out"] != "alias":
        np.testing.assert_array_equal(x, x_before)  # inputs are never written
    assert y.shape == x.shape and y.dtype == x.dtype
    dtype = case["dtype"]
    # Largest term of (x - center) * scale + shift: |y| plus |shift| (<= |bias| + rounding).
    magnitude = np.abs(y_ref).max() + (0.0 if bias is None else np.abs(bias).max()) + 1.0
    data_scale = np.abs(x_before).max() + 1.0
    # Plus the statistics' own error: the float64 mean is good to ~n * 2**-53 of |x|
    # (relative to the data, not to the spread), amplified by |scale| = |w| * invstd.
    n = x.size // case["channels"]
    w_abs = 1.0 if weight is None else np.abs(weight).max()
    stats_err = 8 * n * 2.0**-53 * data_scale * w_abs * invstd_ref.max()
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=atol(dtype, magnitude) + stats_err)
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-9 * data_scale)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-7)
    if rm is not None:
        # Stored in the input dtype: one rounding of values no larger than data_scale**2.
        np.testing.assert_allclose(rm, rm64, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps * data_scale)
        np.testing.assert_allclose(rv, rv64, rtol=4 * np.finfo(dtype).eps + 1e-7, atol=0)


@given(cases())
def test_backward_matches_reference(case):
    case = dict(case, training=case["training"] or not case["running"])
    if expected_error(case):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            x, weight, _, _, _ = draw_inputs(case)
            fastbn.batch_norm_backward(x, x, np.zeros(case["channels"]), np.ones(case["channels"]), weight,
                                       training=True, layout=case["layout"])
        return
    x, weight, bias, rm, rv = draw_inputs(case)
    layout, dtype, training = case["layout"], case["dtype"], case["training"]
    _, mean, invstd = reference.batch_norm_forward(x.astype(np.float64), as64(weight), as64(bias),
                                                   running_mean=as64(rm), running_var=as64(rv),
                                                   training=training,
                                                   eps=case["eps"], layout=layout)
    rng = np.random.default_rng(case["seed"] + 1)
    dy = arrange(rng.standard_normal(case["shape"]).astype(dtype), case["memory"], case["flip_axis"])
    x_before, dy_before = x.copy(), dy.copy()
    out = make_out(case, x, (dy, x))
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                            layout=layout, out=out)
    dx_ref, dw_ref, db_ref = reference.batch_norm_backward(
        dy_before.astype(np.float64), x_before.astype(np.float64), mean, invstd, as64(weight),
        training=training, layout=layout)
    if out is not None:
        assert dx is out
    else:
        np.testing.assert_array_equal(dy, dy_before)
    np.testing.assert_array_equal(x, x_before)
    # Magnitude of the three terms of dx = a*dy + b*(x - center) + t with a = w*invstd:
    # |a*dy| and |t| <= a*max|dy|, |b*(x - center)| <= a*max|x_hat|**2*max|dy|.
    w = np.ones(case["channels"]) if weight is None else weight.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != (1 if layout == "NCHW" else x.ndim - 1))
    bshape = [1] * x.ndim
    bshape[1 if layout == "NCHW" else -1] = -1
    x_hat = (x_before.astype(np.float64) - mean.reshape(bshape)) * invstd.reshape(bshape)
    max_dy = np.abs(dy_before).max()
    magnitude = np.abs(w * invstd).max() * max_dy * (2 + np.abs(x_hat).max() ** 2)
    # Plus the mean's float64 error (~n * 2**-53 * |x|) times the x_scale coefficient
    # (<= w * invstd**2 * max|dy| * max|x_hat|).
    n = x.size // case["channels"]
    stats_err = (8 * n * 2.0**-53 * (np.abs(x_before).max() + 1.0)
                 * np.abs(w * invstd**2).max() * max_dy * np.abs(x_hat).max())
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=atol(dtype, magnitude) + stats_err)
    # dbias, dweight: float64 sums (error ~n * 2**-53 of the sum of magnitudes) rounded
    # once to the input dtype (eps/2 relative): 4 * eps * sum of magnitudes.
    eps = np.finfo(dtype).eps
    abs_dy = np.abs(dy_before.astype(np.float64))
    np.testing.assert_allclose(db, db_ref, rtol=0, atol=4 * eps * abs_dy.sum(axis=axes).max() + 1e-300)
    np.testing.assert_allclose(dw, dw_ref, rtol=0,
                               atol=4 * eps * (abs_dy * np.abs(x_hat)).sum(axis=axes).max() + 1e-300)


@given(cases())
def test_batch_stats_matches_reference(case):
    x, _, _, _, _ = draw_inputs(case)
    mean, var = fastbn.batch_stats(x, layout=case["layout"])
    mean_ref, var_ref = reference.batch_stats(x, layout=case["layout"])
    data_scale = np.abs(x).max() + 1.0
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-9 * data_scale)
    np.testing.assert_allclose(var, var_ref, rtol=1e-7, atol=1e-12 * data_scale**2)

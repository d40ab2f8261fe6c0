"""Repeated calls run cached plans (fastbn._call_plans): same results as the checked
path, and every check still fires for a call whose structure differs from the cached one
in anything a check looks at."""

import numpy as np
import pytest

import fastbn
from fastbn import _call_plans
from fastbn.cpu import small

C = 6


def _args(rng, shape=(8, C, 3, 3), dtype=np.float32):
    x = rng.standard_normal(shape).astype(dtype) + 3
    return x, np.ones(C, dtype), np.zeros(C, dtype), np.zeros(C, dtype), np.ones(C, dtype)


def _forward(x, w, b, rm, rv, **kw):
    return fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, **kw)


def _planned(key):
    return _call_plans.lookup(key) is not None


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False])
def test_a_repeated_call_runs_its_plan_with_the_checked_results(rng, layout, training):
    x, w, b, rm, rv = _args(rng, (8, 3, 3, C) if layout == "NHWC" else (8, C, 3, 3))
    key = _call_plans.forward_key(x, w, b, rm, rv, training, 0.1, 1e-5, layout, None)
    rm2, rv2 = rm.copy(), rv.copy()
    first = _forward(x, w, b, rm, rv, training=training, layout=layout)
    assert _planned(key)
    again = _forward(x, w, b, rm2, rv2, training=training, layout=layout)
    for a, e in zip(again, first):
        np.testing.assert_array_equal(a, e)
    np.testing.assert_array_equal(rm2, rm)
    np.testing.assert_array_equal(rv2, rv)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    grads = fastbn.batch_norm_backward(dy, x, first[1], first[2], w, training=training, layout=layout)
    assert _planned(_call_plans.backward_key(dy, x, first[1], first[2], w, training, layout, None))
    for a, e in zip(fastbn.batch_norm_backward(dy, x, first[1], first[2], w, training=training, layout=layout),
                    grads):
        np.testing.assert_array_equal(a, e)


def test_checks_still_fire_after_a_plan_exists(rng):
    x, w, b, rm, rv = _args(rng)
    _forward(x, w, b, rm, rv)
    _forward(x, w, b, rm, rv)
    with pytest.raises(ValueError, match="running_var: expected a writable array"):
        frozen = rv.copy()
        frozen.flags.writeable = False
        _forward(x, w, b, rm, frozen)
    shared = np.ones(2 * C, np.float32)
    _forward(x, w, b, shared[:C], shared[C:])  # separate halves: fine, and planned
    with pytest.raises(ValueError, match="running_var: expected an array separate from running_mean"):
        _forward(x, w, b, shared[:C], shared[:C])
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        _forward(x, w.astype(np.float64), b, rm, rv)
    with pytest.raises(TypeError, match="training: expected a bool"):
        _forward(x, w, b, rm, rv, training=1)
    with pytest.raises(TypeError, match="eps: expected a real number"):
        _forward(x, w, b, rm, rv, eps=True)
    with pytest.raises(ValueError, match="eps: expected a number in"):
        _forward(x, w, b, rm, rv, eps=0.0)
    with pytest.raises(TypeError, match="weight: expected a numpy.ndarray"):
        _forward(x, list(w), b, rm, rv)


def test_eval_may_read_overlapping_running_statistics(rng):
    x, w, b, _, _ = _args(rng)
    stats = np.ones(C, np.float32)
    for _ in range(2):  # the checked call, then the planned one
        y, mean, _ = _forward(x, w, b, stats, stats, training=False)
    np.testing.assert_array_equal(mean, stats)


def test_plans_follow_the_small_tensor_threshold(rng, monkeypatch):
    x, w, b, rm, rv = _args(rng)
    _forward(x, w, b, rm, rv)
    small_key = _call_plans.forward_key(x, w, b, rm, rv, True, 0.1, 1e-5, "NCHW", None)
    monkeypatch.setattr(small, "SMALL_SIZE", 0)
    assert _call_plans.forward_key(x, w, b, rm, rv, True, 0.1, 1e-5, "NCHW", None) != small_key
    _forward(x, w, b, rm, rv)  # the parallel kernels: no one-call plan
    assert not _planned(_call_plans.forward_key(x, w, b, rm, rv, True, 0.1, 1e-5, "NCHW", None))


def test_calls_outside_the_common_form_have_no_key(rng):
    x, w, b, rm, rv = _args(rng)
    assert _call_plans.forward_key(x, w, b, rm, rv, np.True_, 0.1, 1e-5, "NCHW", None) is None
    assert _call_plans.forward_key(x, w, b, rm, rv, True, 0.1, np.float32(1e-5), "NCHW", None) is None
    assert _call_plans.forward_key(x.tolist(), w, b, rm, rv, True, 0.1, 1e-5, "NCHW", None) is None
    assert _call_plans.backward_key(x, x, rm, rv, w.tolist(), True, "NCHW", None) is None


def test_out_is_planned_and_overlap_is_decided_per_call(rng):
    x, w, b, rm, rv = _args(rng)
    expected = _forward(x, w, b, rm.copy(), rv.copy())[0]
    out = np.empty_like(x)
    for _ in range(2):  # the checked call, then the planned one
        y = _forward(x, w, b, rm.copy(), rv.copy(), out=out)[0]
        assert y is out
        np.testing.assert_array_equal(out, expected)
    assert _planned(_call_plans.forward_key(x, w, b, rm, rv, True, 0.1, 1e-5, "NCHW", out))
    inplace = x.copy()
    for _ in range(2):  # out is x: same structure as out above, read and written at the same index
        source = inplace.copy()
        _forward(inplace, w, b, rm.copy(), rv.copy(), out=inplace)
        np.testing.assert_array_equal(inplace, _forward(source, w, b, rm.copy(), rv.copy())[0])
    buffer = np.concatenate([x.ravel(), np.zeros(C * 9, x.dtype)])
    shifted_in, shifted_out = buffer[:x.size].reshape(x.shape), buffer[C * 9:].reshape(x.shape)
    y = _forward(shifted_in, w, b, rm.copy(), rv.copy(), out=shifted_out)[0]  # partial overlap
    np.testing.assert_array_equal(y, expected)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    _, mean, invstd = _forward(x, w, b, rm.copy(), rv.copy())
    dx_expected = fastbn.batch_norm_backward(dy, x, mean, invstd, w)[0]
    for _ in range(2):
        dx = fastbn.batch_norm_backward(dy, x, mean, invstd, w, out=out)[0]
        assert dx is out
        np.testing.assert_array_equal(dx, dx_expected)
    for lo, hi in ((0, C * 9), (C * 9, 0)):  # out behind and ahead of its input, in part
        shifted_dy, shifted_out = buffer[lo:lo + x.size].reshape(x.shape), buffer[hi:hi + x.size].reshape(x.shape)
        shifted_dy[...] = dy
        dx = fastbn.batch_norm_backward(shifted_dy, x, mean, invstd, w, out=shifted_out)[0]
        assert dx is shifted_out
        np.testing.assert_array_equal(dx, dx_expected)

"""Robustness of the public API on the CPU backend (issue 6).

Bad arguments (clear ValueError/TypeError naming the argument, never a Numba typing
traceback), edge values (NaN/Inf/denormals/huge/tiny eps), edge shapes, state that must
survive a failed call, aliasing between ``out`` and the inputs, and concurrent use
(Python threads, ``workqueue`` threading layer, forked children, unusable cache dirs).

Tolerances.  ``y``/``dx`` are computed as ``(x - center) * scale + shift`` (dx: one more
product term) in the input's dtype from float64 per-channel coefficients: at most ~6
roundings, each <= eps/2 times an operand no larger than the largest term, so
``16 * eps * magnitude`` bounds the error with a 2x margin (``_atol``).  Statistics are
float64 on both sides; on the small, well-scaled data used here they agree to ~1e-13
relative, checked at ``1e-10``.
"""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastbn
from fastbn import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = ("NCHW", "NHWC")
DTYPES = (np.float32, np.float64)


def _atol(dtype, magnitude):
    return 16 * np.finfo(dtype).eps * max(float(magnitude), 1.0)


def _x(shape, dtype=np.float32, seed=0, offset=0.0):
    return (np.random.default_rng(seed).standard_normal(shape) + offset).astype(dtype)


def _ref_forward(x, *args, **kwargs):
    """The float64 reference on float64 copies (running stats are copied, not updated)."""
    cast = [None if a is None else np.array(a, dtype=np.float64) for a in args]
    with np.errstate(all="ignore"):  # NaN/Inf cases: the reference warns, fastbn does not
        return reference.batch_norm_forward(x.astype(np.float64), *cast, **kwargs)


def _ref_backward(dy, x, mean, invstd, weight=None, **kwargs):
    w = None if weight is None else weight.astype(np.float64)
    with np.errstate(all="ignore"):
        return reference.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                             mean, invstd, w, **kwargs)


def _run_python(code, env=None, timeout=240):
    """Run ``code`` in a fresh interpreter with the repository on the path."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


# =========================================================================== bad arguments

X = _x((4, 3, 5))
C3 = np.ones(3, np.float32)
F = fastbn.batch_norm_forward
B = fastbn.batch_norm_backward
S = fastbn.batch_stats


def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


#: (call, exception type, fragments the message must contain: the argument's name,
#: what was expected, what came).
BAD_ARGUMENTS = {
    "x list": (lambda: F([[1.0, 2.0], [3.0, 4.0]]), TypeError, ["x:", "numpy.ndarray", "list"]),
    "x python scalar": (lambda: F(1.0), TypeError, ["x:", "float"]),
    "x numpy scalar": (lambda: F(np.float32(1.0)), TypeError, ["x:", "float32"]),
    "x 0-d": (lambda: F(np.array(1.0, np.float32)), ValueError, ["x:", "rank 2 to 5", "rank 0"]),
    "x 1-d": (lambda: F(np.ones(4, np.float32)), ValueError, ["x:", "rank 2 to 5", "rank 1"]),
    "x rank 6": (lambda: F(np.ones((2,) * 6, np.float32)), ValueError, ["x:", "rank 2 to 5", "rank 6"]),
    "x int32": (lambda: F(np.ones((4, 3), np.int32)), TypeError, ["x:", "float32 or float64", "int32"]),
    "x int64": (lambda: F(np.ones((4, 3), np.int64)), TypeError, ["x:", "float32 or float64", "int64"]),
    "x bool": (lambda: F(np.ones((4, 3), bool)), TypeError, ["x:", "float32 or float64", "bool"]),
    "x complex": (lambda: F(np.ones((4, 3), np.complex64)), TypeError, ["x:", "complex64"]),
    "x object": (lambda: F(np.ones((4, 3), object)), TypeError, ["x:", "object"]),
    "x float16 on CPU": (lambda: F(np.ones((4, 3), np.float16)), TypeError, ["x:", "float32 or float64", "float16"]),
    "x big-endian": (lambda: F(np.ones((4, 3), ">f4")), TypeError, ["x:", ">f4"]),
    "x structured": (lambda: F(np.zeros((4, 3), [("a", "f4")])), TypeError, ["x:", "float32"]),
    "x masked": (lambda: F(np.ma.ones((4, 3), np.float32)), TypeError, ["x:", "masked"]),
    "x empty N": (lambda: F(np.ones((0, 3), np.float32)), ValueError, ["x:", "non-empty", "(0, 3)"]),
    "x empty C": (lambda: F(np.ones((4, 0), np.float32)), ValueError, ["x:", "non-empty", "(4, 0)"]),
    "x empty spatial": (lambda: F(np.ones((4, 3, 0, 2), np.float32)), ValueError, ["x:", "non-empty"]),
    "layout unknown": (lambda: F(X, layout="NHCW"), ValueError, ["layout:", "'NCHW' or 'NHWC'", "NHCW"]),
    "layout lowercase": (lambda: F(X, layout="nchw"), ValueError, ["layout:", "nchw"]),
    "layout None": (lambda: F(X, layout=None), ValueError, ["layout:", "None"]),
    "weight length": (lambda: F(X, np.ones(4, np.float32)), ValueError, ["weight:", "(3,)", "(4,)"]),
    "weight dtype": (lambda: F(X, np.ones(3)), TypeError, ["weight:", "float32", "float64"]),
    "weight rank": (lambda: F(X, np.ones((3, 1), np.float32)), ValueError, ["weight:", "(3,)", "(3, 1)"]),
    "weight 0-d": (lambda: F(X, np.array(1.0, np.float32)), ValueError, ["weight:", "(3,)", "()"]),
    "weight list": (lambda: F(X, [1.0, 1.0, 1.0]), TypeError, ["weight:", "list"]),
    "weight masked": (lambda: F(X, np.ma.ones(3, np.float32)), TypeError, ["weight:", "masked"]),
    "bias length": (lambda: F(X, None, np.ones(2, np.float32)), ValueError, ["bias:", "(3,)", "(2,)"]),
    "bias dtype": (lambda: F(X, None, np.ones(3, np.int32)), TypeError, ["bias:", "float32", "int32"]),
    "running_mean length": (lambda: F(X, running_mean=np.zeros(2, np.float32), running_var=C3.copy()),
                            ValueError, ["running_mean:", "(3,)", "(2,)"]),
    "running_var dtype": (lambda: F(X, running_mean=np.zeros(3, np.float32), running_var=np.ones(3)),
                          TypeError, ["running_var:", "float32", "float64"]),
    "running_var rank": (lambda: F(X, running_mean=np.zeros(3, np.float32),
                                   running_var=np.ones((1, 3), np.float32)),
                         ValueError, ["running_var:", "(3,)", "(1, 3)"]),
    "only running_mean": (lambda: F(X, running_mean=np.zeros(3, np.float32)), ValueError,
                          ["running_var:", "both or neither", "None"]),
    "only running_var": (lambda: F(X, running_var=np.ones(3, np.float32)), ValueError,
                         ["running_mean:", "both or neither", "None"]),
    "eval without running stats": (lambda: F(X, training=False), ValueError,
                                   ["running_mean", "training=False", "None"]),
    "F.batch_norm eval default": (lambda: fastbn.batch_norm(X), ValueError, ["running_mean", "None"]),
    "running_mean read-only": (lambda: F(X, running_mean=_ro(np.zeros(3, np.float32)), running_var=C3.copy()),
                               ValueError, ["running_mean:", "writable", "read-only"]),
    "running_var read-only": (lambda: F(X, running_mean=np.zeros(3, np.float32), running_var=_ro(C3)),
                              ValueError, ["running_var:", "writable", "read-only"]),
    "running stats share memory": (lambda: F(X, running_mean=C3, running_var=C3), ValueError,
                                   ["running_var:", "running_mean", "memory"]),
    "one value per channel (N=1, 2-d)": (lambda: F(np.ones((1, 3), np.float32)), ValueError,
                                         ["Expected more than 1 value per channel when training"]),
    "one value per channel (N=1, L=1)": (lambda: F(np.ones((1, 3, 1, 1), np.float32)), ValueError,
                                         ["Expected more than 1 value per channel when training"]),
    "one value per channel NHWC": (lambda: F(np.ones((1, 1, 4), np.float32), layout="NHWC"), ValueError,
                                   ["Expected more than 1 value per channel when training"]),
    "eps zero": (lambda: F(X, eps=0.0), ValueError, ["eps:", "(0.0, inf]", "0.0"]),
    "eps negative": (lambda: F(X, eps=-1e-5), ValueError, ["eps:", "-1e-05"]),
    "eps NaN": (lambda: F(X, eps=float("nan")), ValueError, ["eps:", "nan"]),
    "eps string": (lambda: F(X, eps="1e-5"), TypeError, ["eps:", "real number", "str"]),
    "eps None": (lambda: F(X, eps=None), TypeError, ["eps:", "NoneType"]),
    "eps array": (lambda: F(X, eps=np.array(1e-5)), TypeError, ["eps:", "ndarray"]),
    "momentum negative": (lambda: F(X, momentum=-0.1), ValueError, ["momentum:", "[0.0, 1.0]", "-0.1"]),
    "momentum above 1": (lambda: F(X, momentum=1.5), ValueError, ["momentum:", "1.5"]),
    "momentum NaN": (lambda: F(X, momentum=float("nan")), ValueError, ["momentum:", "nan"]),
    "momentum bool": (lambda: F(X, momentum=True), TypeError, ["momentum:", "bool"]),
    "training int": (lambda: F(X, training=1), TypeError, ["training:", "bool", "int"]),
    "training None": (lambda: F(X, training=None), TypeError, ["training:", "NoneType"]),
    "out shape": (lambda: F(X, out=np.empty((4, 3, 6), np.float32)), ValueError, ["out:", "(4, 3, 5)", "(4, 3, 6)"]),
    "out dtype": (lambda: F(X, out=np.empty((4, 3, 5))), TypeError, ["out:", "float32", "float64"]),
    "out read-only": (lambda: F(X, out=_ro(np.empty((4, 3, 5), np.float32))), ValueError,
                      ["out:", "writable", "read-only"]),
    "out list": (lambda: F(X, out=[0.0]), TypeError, ["out:", "list"]),
    "out broadcast (stride 0)": (
        lambda: F(X, out=np.lib.stride_tricks.as_strided(np.empty(15, np.float32), (4, 3, 5), (0, 20, 4))),
        ValueError, ["out:", "overlap", "strides"]),
    "backward dy shape": (lambda: B(np.ones((4, 3, 6), np.float32), X, np.zeros(3), np.ones(3)),
                          ValueError, ["dy:", "(4, 3, 5)", "(4, 3, 6)"]),
    "backward dy dtype": (lambda: B(X.astype(np.float64), X, np.zeros(3), np.ones(3)),
                          TypeError, ["dy:", "float32", "float64"]),
    "backward dy list": (lambda: B([[1.0]], X, np.zeros(3), np.ones(3)), TypeError, ["dy:", "list"]),
    "backward x int": (lambda: B(X, X.astype(np.int64), np.zeros(3), np.ones(3)), TypeError, ["x:", "int64"]),
    "backward save_mean None": (lambda: B(X, X, None, np.ones(3)), ValueError, ["save_mean:", "(3,)", "None"]),
    "backward save_invstd None": (lambda: B(X, X, np.zeros(3), None), ValueError, ["save_invstd:", "None"]),
    "backward save_mean length": (lambda: B(X, X, np.zeros(4), np.ones(3)), ValueError, ["save_mean:", "(4,)"]),
    "backward save_invstd int": (lambda: B(X, X, np.zeros(3), np.ones(3, int)), TypeError,
                                 ["save_invstd:", "int64"]),
    "backward weight dtype": (lambda: B(X, X, np.zeros(3), np.ones(3), np.ones(3)), TypeError,
                              ["weight:", "float32", "float64"]),
    "backward one value per channel": (
        lambda: B(np.ones((1, 3), np.float32), np.ones((1, 3), np.float32), np.zeros(3), np.ones(3)),
        ValueError, ["Expected more than 1 value per channel when training"]),
    "backward layout": (lambda: B(X, X, np.zeros(3), np.ones(3), layout="CHWN"), ValueError, ["layout:"]),
    "backward out dtype": (lambda: B(X, X, np.zeros(3), np.ones(3), out=np.empty((4, 3, 5))), TypeError,
                           ["out:", "float32"]),
    "backward training str": (lambda: B(X, X, np.zeros(3), np.ones(3), training="yes"), TypeError,
                              ["training:", "str"]),
    "batch_stats list": (lambda: S([[1.0, 2.0]]), TypeError, ["x:", "list"]),
    "batch_stats int": (lambda: S(np.ones((2, 2), int)), TypeError, ["x:", "int64"]),
    "batch_stats 1-d": (lambda: S(np.ones(5)), ValueError, ["x:", "rank 1"]),
    "batch_stats layout": (lambda: S(X, layout=1), ValueError, ["layout:", "1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_argument_raises_clear_error(case):
    call, exc_type, fragments = BAD_ARGUMENTS[case]
    with pytest.raises(exc_type) as info:
        call()
    # Exactly ValueError/TypeError from fastbn, not a Numba error that happens to subclass one.
    assert type(info.value) is exc_type, type(info.value)
    assert type(info.value).__module__ == "builtins"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_reference_raises_the_same_errors():
    """The reference shares _checks; spot-check that it rejects like the kernels do."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        reference.batch_norm_forward(np.ones((1, 3)))
    with pytest.raises(ValueError, match="eps:"):
        reference.batch_norm_forward(np.ones((4, 3)), eps=0.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_and_bias_are_independently_optional(layout):
    """As PyTorch: weight without bias and bias without weight are both valid."""
    x = _x((4, 5, 3, 2) if layout == "NCHW" else (4, 3, 2, 5), np.float64, seed=1)
    w = np.linspace(0.5, 2.0, 5)
    b = np.linspace(-1.0, 1.0, 5)
    for weight, bias in ((w, None), (None, b), (None, None), (w, b)):
        y, mean, invstd = F(x, weight, bias, layout=layout)
        yr, _, _ = _ref_forward(x, weight, bias, layout=layout)
        np.testing.assert_allclose(y, yr, rtol=0, atol=_atol(np.float64, np.abs(yr).max()))
        dy = _x(x.shape, np.float64, seed=2)
        dx, dw, db = B(dy, x, mean, invstd, weight, layout=layout)
        dxr, dwr, dbr = _ref_backward(dy, x, mean, invstd, weight, layout=layout)
        np.testing.assert_allclose(dx, dxr, rtol=0, atol=_atol(np.float64, 3 * np.abs(dxr).max() + 3))
        np.testing.assert_allclose(dw, dwr, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(db, dbr, rtol=1e-10, atol=1e-10)


def test_accepted_scalar_kinds():
    """numpy scalars and ints are fine for eps/momentum; bools (np.bool_ too) for training."""
    a = F(X, eps=np.float32(1e-3), momentum=np.float64(0.5), training=np.bool_(True))[0]
    b = F(X, eps=1e-3, momentum=0.5, training=True)[0]
    np.testing.assert_array_equal(a, b)
    y_eps1 = F(X, eps=1)[0]
    np.testing.assert_allclose(y_eps1, F(X, eps=1.0)[0], rtol=0, atol=0)


# =========================================================================== no state lost

def _stateful_args(x):
    c = x.shape[1]
    return dict(running_mean=np.arange(c, dtype=x.dtype), running_var=np.arange(1, c + 1, dtype=x.dtype),
                out=np.full(x.shape, 7.0, x.dtype))


@pytest.mark.parametrize("bad", ["weight", "bias", "eps", "momentum", "layout", "out_dtype", "x_one_value"])
def test_failed_call_leaves_running_stats_and_out_untouched(bad):
    x = _x((4, 3, 5)) if bad != "x_one_value" else _x((1, 3))
    args = _stateful_args(x)
    kwargs = dict(training=True)
    weight = bias = None
    if bad == "weight":
        weight = np.ones(4, np.float32)
    elif bad == "bias":
        bias = np.ones(3, np.float64)
    elif bad == "eps":
        kwargs["eps"] = -1.0
    elif bad == "momentum":
        kwargs["momentum"] = 2.0
    elif bad == "layout":
        kwargs["layout"] = "NCWH"
    elif bad == "out_dtype":
        args["out"] = np.full(x.shape, 7.0, np.float64)
    before = {k: v.copy() for k, v in args.items()}
    x_before = x.copy()
    with pytest.raises((ValueError, TypeError)):
        F(x, weight, bias, running_mean=args["running_mean"], running_var=args["running_var"],
          out=args["out"], **kwargs)
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_inputs_are_never_written(layout, training):
    """Read-only inputs are accepted (no write is even attempted) and stay bit-identical."""
    x = _ro(_x((3, 4, 5, 6) if layout == "NCHW" else (3, 5, 6, 4), np.float32, seed=3))
    w, b = _ro(np.linspace(0.5, 1.5, 4).astype(np.float32)), _ro(np.linspace(-1, 1, 4).astype(np.float32))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    if not training:  # eval only reads the running stats: read-only is fine
        rm, rv = _ro(rm), _ro(rv)
    snapshot = [a.copy() for a in (x, w, b)]
    y, mean, invstd = F(x, w, b, running_mean=rm, running_var=rv, training=training, layout=layout)
    dy = _ro(_x(x.shape, np.float32, seed=4))
    mean, invstd = _ro(mean), _ro(invstd)
    dx, dw, db = B(dy, x, mean, invstd, w, training=training, layout=layout)
    for a, s in zip((x, w, b), snapshot):
        np.testing.assert_array_equal(a, s)
    assert not np.shares_memory(y, x) and not np.shares_memory(dx, dy) and not np.shares_memory(dx, x)


# =========================================================================== out and aliasing

def _check_forward_out(x, out, layout="NCHW"):
    w = np.linspace(0.5, 1.5, x.shape[1 if layout == "NCHW" else -1]).astype(x.dtype)
    yr, mr, sr = _ref_forward(x, w, None, layout=layout)
    y, mean, invstd = F(x, w, None, layout=layout, out=out)
    assert y is out
    np.testing.assert_allclose(out, yr, rtol=0, atol=_atol(x.dtype, np.abs(yr).max()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_is_x(layout):
    x = _x((4, 3, 6, 5), seed=5)
    xc = x.copy()
    _check_forward_out_inplace = F(xc, layout=layout, out=xc)[0]
    assert _check_forward_out_inplace is xc
    yr = _ref_forward(x, layout=layout)[0]
    np.testing.assert_allclose(xc, yr, rtol=0, atol=_atol(np.float32, np.abs(yr).max()))


@pytest.mark.parametrize("shift", [1, 7, -3])
def test_out_partially_overlapping_x(shift):
    """out and x are shifted windows of one buffer: the driver must use a temporary."""
    shape = (4, 3, 5, 5)
    size = int(np.prod(shape))
    buf = np.empty(size + abs(shift), np.float32)
    x_start, out_start = (0, shift) if shift > 0 else (-shift, 0)
    x = buf[x_start:x_start + size].reshape(shape)
    x[...] = _x(shape, seed=6)
    x_copy = x.copy()
    out = buf[out_start:out_start + size].reshape(shape)
    yr = _ref_forward(x_copy)[0]
    F(x, out=out)
    np.testing.assert_allclose(out, yr, rtol=0, atol=_atol(np.float32, np.abs(yr).max()))


@pytest.mark.parametrize("which", ["dy", "x", "partial"])
@pytest.mark.parametrize("training", [True, False])
def test_backward_out_aliasing(which, training):
    shape = (4, 3, 10)
    x = _x(shape, np.float64, seed=7)
    dy = _x(shape, np.float64, seed=8)
    _, mean, invstd = F(x)
    dxr = _ref_backward(dy, x, mean, invstd, training=training)[0]
    if which == "partial":
        buf = np.empty(dy.size + 5)
        buf[5:] = dy.ravel()
        dy_view = buf[5:].reshape(shape)
        out = buf[:-5].reshape(shape)
        dx = B(dy_view, x, mean, invstd, training=training, out=out)[0]
    else:
        target = (dy if which == "dy" else x).copy()
        args = (target, x, mean, invstd) if which == "dy" else (dy, target, mean, invstd)
        dx = B(*args, training=training, out=target)[0]
        assert dx is target
    np.testing.assert_allclose(dx, dxr, rtol=0, atol=_atol(np.float64, 3 * np.abs(dxr).max() + 3))


@pytest.mark.parametrize("kind", ["channels_last", "fortran", "strided", "negative"])
def test_out_in_any_memory_order(kind):
    x = _x((3, 4, 5, 6), np.float64, seed=9)
    if kind == "channels_last":
        out = np.empty((3, 5, 6, 4)).transpose(0, 3, 1, 2)
    elif kind == "fortran":
        out = np.asfortranarray(np.empty(x.shape))
    elif kind == "strided":
        out = np.empty((3, 4, 10, 6))[:, :, ::2]
    else:
        out = np.empty(x.shape)[:, ::-1]
    _check_forward_out(x, out)


# =========================================================================== edge values

def _put(x, layout, channel, value, index=1):
    """Set one element of ``channel`` (at batch ``index``) to ``value``."""
    if layout == "NCHW":
        x[index, channel].flat[2] = value
    else:
        x[index, ..., channel].flat[2] = value


def _channel(a, layout, c):
    return a[:, c] if layout == "NCHW" else a[..., c]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("first", [False, True])
def test_nonfinite_poisons_only_its_channel(layout, dtype, value, first):
    """As PyTorch: a NaN/Inf makes its channel's statistics and y NaN, other channels exact."""
    shape = (3, 4, 5, 5) if layout == "NCHW" else (3, 5, 5, 4)
    x = _x(shape, dtype, seed=10)
    bad = 2
    if first:  # the very first value of the channel (the shift k of the shifted sums)
        _channel(x, layout, bad).flat[0] = value
    else:
        _put(x, layout, bad, value)
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    y, mean, invstd = F(x, running_mean=rm, running_var=rv, layout=layout)
    yr, mr, sr = _ref_forward(x, layout=layout)
    assert np.isnan(_channel(y, layout, bad)).all()
    assert np.isnan(invstd[bad]) and not np.isfinite(mean[bad])
    assert not np.isfinite(rm[bad]) and np.isnan(rv[bad])
    good = [c for c in range(4) if c != bad]
    for c in good:
        ref = _channel(yr, layout, c)
        np.testing.assert_allclose(_channel(y, layout, c), ref, rtol=0, atol=_atol(dtype, np.abs(ref).max()))
    np.testing.assert_allclose(mean[good], mr[good], rtol=1e-10, atol=1e-12)
    assert np.isfinite(rm[good]).all() and np.isfinite(rv[good]).all()

    # Backward: a NaN in dy of one channel stays in that channel.
    dy = _x(shape, dtype, seed=11)
    _put(dy, layout, 1, np.nan)
    x_clean = _x(shape, dtype, seed=10)
    _, m, s = F(x_clean, layout=layout)
    dx, dw, db = B(dy, x_clean, m, s, layout=layout)
    assert np.isnan(_channel(dx, layout, 1)).all() and np.isnan(dw[1]) and np.isnan(db[1])
    others = [0, 2, 3]
    assert np.isfinite(dw[others]).all() and np.isfinite(db[others]).all()
    for c in others:
        assert np.isfinite(_channel(dx, layout, c)).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_in_eval_stays_elementwise(layout, dtype):
    shape = (3, 4, 5) if layout == "NCHW" else (3, 5, 4)
    x = _x(shape, dtype, seed=12)
    _put(x, layout, 1, np.inf)
    _put(x, layout, 2, np.nan)
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    y = F(x, running_mean=rm, running_var=rv, training=False, layout=layout)[0]
    assert np.isposinf(y).sum() == 1 and np.isnan(y).sum() == 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-30, 1e-300])
def test_constant_channel_gives_bias(layout, dtype, eps):
    """var = 0: y = bias exactly (not NaN), even when 1/sqrt(eps) overflows float32."""
    shape = (4, 3, 6) if layout == "NCHW" else (4, 6, 3)
    x = _x(shape, dtype, seed=13)
    _channel(x, layout, 1)[...] = 3.25
    bias = np.array([0.0, 7.5, -1.0], dtype)
    y, mean, invstd = F(x, np.ones(3, dtype), bias, eps=eps, layout=layout)
    np.testing.assert_array_equal(_channel(y, layout, 1), 7.5)
    assert mean[1] == 3.25 and invstd[1] == pytest.approx(1 / np.sqrt(eps), rel=1e-12)
    dx, dw, db = B(np.ones(shape, dtype), x, mean, invstd, layout=layout)
    assert not np.isnan(dx).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_denormal_inputs(layout):
    shape = (4, 3, 8) if layout == "NCHW" else (4, 8, 3)
    x = (_x(shape, np.float64, seed=14) * 1e-39).astype(np.float32)  # float32 subnormals
    assert (np.abs(x[x != 0]) < np.finfo(np.float32).tiny).all()
    y, mean, invstd = F(x, layout=layout)
    yr, mr, sr = _ref_forward(x, layout=layout)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(mean, mr, rtol=1e-9, atol=1e-50)
    np.testing.assert_allclose(invstd, sr, rtol=1e-9)
    np.testing.assert_allclose(y, yr, rtol=0, atol=_atol(np.float32, np.abs(yr).max()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, scale", [(np.float32, 1e30), (np.float32, 1e37), (np.float64, 1e150)])
def test_huge_magnitudes_do_not_overflow_the_statistics(layout, dtype, scale):
    """Sums of squares of 1e37 overflow float32 but not the float64 accumulators."""
    shape = (4, 3, 8) if layout == "NCHW" else (4, 8, 3)
    x = (_x(shape, np.float64, seed=15, offset=2.0) * scale).astype(dtype)
    y, mean, invstd = F(x, layout=layout)
    yr, mr, sr = _ref_forward(x, layout=layout)
    assert np.isfinite(yr).all() and np.isfinite(y).all() and np.isfinite(mean).all()
    np.testing.assert_allclose(mean, mr, rtol=1e-10)
    np.testing.assert_allclose(invstd, sr, rtol=1e-9)
    np.testing.assert_allclose(y, yr, rtol=0, atol=_atol(dtype, np.abs(yr).max()))
    m, v = S(x, layout=layout)
    assert np.isfinite(v).all()


# =========================================================================== edge shapes

EDGE_SHAPES = [
    ((1, 2, 40000), "NCHW"),        # N=1, planes longer than one work block (PLANE_BLOCK)
    ((1, 40000, 2), "NHWC"),
    ((6, 1, 7, 3), "NCHW"),          # C=1
    ((6, 7, 3, 1), "NHWC"),
    ((2, 65536), "NCHW"),            # C large, 2 values per channel
    ((2, 65536), "NHWC"),
    ((2, 1, 1, 1, 3000), "NHWC"),    # rank 5, wide channel-last rows
    ((2, 3, 1, 1, 2), "NCHW"),       # size-1 spatial dims
    ((3, 2, 2, 2, 2), "NCHW"),
]


@pytest.mark.parametrize("shape, layout", EDGE_SHAPES)
def test_edge_shapes(shape, layout):
    x = _x(shape, np.float32, seed=16, offset=1.0)
    c = shape[1] if layout == "NCHW" else shape[-1]
    w = np.linspace(0.5, 1.5, c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    rm_r, rv_r = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = F(x, w, None, running_mean=rm, running_var=rv, layout=layout)
    with np.errstate(all="ignore"):
        yr, mr, sr = reference.batch_norm_forward(x.astype(np.float64), w.astype(np.float64), None,
                                                  running_mean=rm_r, running_var=rv_r, layout=layout)
    np.testing.assert_allclose(y, yr, rtol=0, atol=_atol(np.float32, np.abs(yr).max()))
    np.testing.assert_allclose(mean, mr, rtol=1e-10, atol=1e-12)
    # Two values per channel: var can be ~0 relative to the values; compare invstd loosely
    # only where the reference variance is well above float64 rounding of the sums.
    np.testing.assert_allclose(invstd, sr, rtol=1e-6)
    np.testing.assert_allclose(rm, rm_r, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, rv_r, rtol=1e-6, atol=1e-7)
    dy = _x(shape, np.float32, seed=17)
    dx, dw, db = B(dy, x, mean, invstd, w, layout=layout)
    dxr, dwr, dbr = _ref_backward(dy, x, mean, invstd, w, layout=layout)
    np.testing.assert_allclose(dx, dxr, rtol=0, atol=_atol(np.float32, 3 * np.abs(dxr).max() + 3))
    np.testing.assert_allclose(db, dbr, rtol=1e-5, atol=1e-4)


def test_integer_types_in_kernels_are_64_bit():
    """Index arithmetic past 2**31 elements: every integer the kernels compute is 64-bit.

    A real >2**31-element run needs >16 GiB and minutes (see the slow test below).  This
    check is its cheap, exact stand-in: after compiling each kernel, every integer-typed
    variable in Numba's type map (loop indices, item -> (n, c, block) decomposition,
    ``lo = b * block`` offsets, slice bounds) must be int64/uint64, so no product of
    indices can wrap at 2**31.  The driver's own sizes are Python ints and the partial
    counts float64 (exact to 2**53).
    """
    import numba
    from fastbn.cpu import nchw, nhwc, welford

    for shape, layout in (((2, 3, 4, 5), "NCHW"), ((2, 4, 5, 3), "NHWC")):
        x = _x(shape)
        _, m, s = F(x, layout=layout)
        B(x, x, m, s, layout=layout)
    kernels = [obj for mod in (nchw, nhwc, welford) for obj in vars(mod).values()
               if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.signatures]
    assert len(kernels) >= 9
    from numba.core import compiler, typed_passes
    from numba.core.registry import cpu_target

    typingctx, targetctx = cpu_target.typing_context, cpu_target.target_context
    typingctx.refresh()
    targetctx.refresh()
    checked = 0
    for kernel in kernels:
        for signature in kernel.signatures:
            # Type inference only (overloads loaded from the disk cache carry no type map).
            func_ir = compiler.run_frontend(kernel.py_func)
            typed = typed_passes.type_inference_stage(typingctx, targetctx, func_ir, signature, None)
            for name, ty in typed.typemap.items():
                if isinstance(ty, numba.types.Integer):
                    assert ty.bitwidth == 64, (kernel.__name__, name, ty)
                    checked += 1
    assert checked > 50


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTBN_SLOW"), reason="needs ~17 GiB and minutes; set FASTBN_SLOW=1")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_more_than_2_31_elements(layout):
    """A real 2**31 + 64-element float32 tensor (8 GiB, y another 8 GiB).

    Values follow a known pattern so the statistics are exact in closed form: channel c
    holds the repeating sequence 0, 1, 2, 3 (+ c), whose mean is 1.5 + c and variance 1.25.
    """
    c = 2
    per_channel = (2**31 + 64) // c
    shape = (1, c, per_channel) if layout == "NCHW" else (per_channel, 1, c)
    x = np.empty(shape, np.float32)
    pattern = np.arange(4, dtype=np.float32)
    for ch in range(c):
        view = x[0, ch] if layout == "NCHW" else x[:, 0, ch]
        view[...] = np.resize(pattern, per_channel) + ch
    y, mean, invstd = F(x, layout=layout)
    np.testing.assert_allclose(mean, 1.5 + np.arange(c), rtol=1e-12)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(1.25 + 1e-5), rtol=1e-9)
    expected = (pattern - 1.5) / np.sqrt(1.25 + 1e-5)
    for ch in range(c):
        tail = y[0, ch, -8:] if layout == "NCHW" else y[-8:, 0, ch]
        np.testing.assert_allclose(tail, np.resize(expected, per_channel)[-8:], atol=1e-5)


# =========================================================================== concurrency

@pytest.mark.parametrize("layout", LAYOUTS)
def test_python_threads_get_correct_results(layout):
    """Several threads call fastbn at once (kernels release the GIL) with distinct inputs."""
    shapes = [(8, 16, 12, 12), (4, 3, 33), (16, 64), (2, 8, 5, 5, 5)]
    jobs = []
    for i, shape in enumerate(shapes * 2):
        dtype = DTYPES[i % 2]
        s = shape if layout == "NCHW" or len(shape) == 2 else (shape[0], *shape[2:], shape[1])
        x = _x(s, dtype, seed=100 + i, offset=i)
        expected = F(x, layout=layout)
        jobs.append((x, expected))
    errors = []
    barrier = threading.Barrier(len(jobs))

    def work(x, expected):
        try:
            barrier.wait()
            for _ in range(5):
                y, mean, invstd = F(x, layout=layout)
                dx = B(y, x, mean, invstd, layout=layout)[0]
                np.testing.assert_array_equal(y, expected[0])
                np.testing.assert_array_equal(mean, expected[1])
                assert dx.shape == x.shape
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]


_THREADS_SCRIPT = """
    import threading, numpy as np, numba, fastbn
    xs = [np.random.default_rng(i).standard_normal((8, 16, 20, 20)).astype(np.float32) for i in range(4)]
    expected = [fastbn.batch_norm_forward(x)[0] for x in xs]
    bad = []
    def work(i):
        for _ in range(20):
            if not np.array_equal(fastbn.batch_norm_forward(xs[i])[0], expected[i]):
                bad.append(i)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(numba.threading_layer(), len(bad))
"""


def test_threads_on_workqueue_layer_do_not_abort():
    """Numba's workqueue layer aborts the process on concurrent launches; fastbn's
    launch lock must serialize them (run in a child so an abort cannot kill pytest)."""
    result = _run_python(_THREADS_SCRIPT, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["workqueue", "0"], result.stdout


_FORK_SCRIPT = """
    import multiprocessing as mp, numpy as np, numba, fastbn
    from fastbn.cpu import _jit
    def child(q):
        x = np.random.default_rng(1).standard_normal((4, 6, 9, 9)).astype(np.float32)
        y, m, s = fastbn.batch_norm_forward(x)
        dx = fastbn.batch_norm_backward(y, x, m, s)[0]
        y2 = fastbn.batch_norm_forward(np.moveaxis(x, 1, -1).copy(), layout="NHWC")[0]
        q.put((y, m, dx, y2, _jit._serial_only))
    if __name__ == "__main__":
        x = np.random.default_rng(1).standard_normal((4, 6, 9, 9)).astype(np.float32)
        y, m, s = fastbn.batch_norm_forward(x)          # the parent launches kernels first
        dx = fastbn.batch_norm_backward(y, x, m, s)[0]
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        yc, mc, dxc, y2c, serial = q.get(timeout=200)
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        np.testing.assert_allclose(yc, y, rtol=0, atol=1e-5)
        np.testing.assert_allclose(mc, m, rtol=1e-12)
        np.testing.assert_allclose(dxc, dx, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.moveaxis(y2c, -1, 1), y, rtol=0, atol=1e-5)
        print(numba.threading_layer(), serial)
"""


def test_forked_child_can_use_fastbn():
    """GNU OpenMP kills a forked child at its first parallel launch; fastbn must detect the
    fork and run serial kernels there (and stay parallel on fork-safe layers)."""
    result = _run_python(_FORK_SCRIPT.replace('if __name__ == "__main__":', "if True:"))
    assert result.returncode == 0, result.stderr[-3000:]
    layer, serial = result.stdout.split()
    assert serial == str(layer == "omp"), result.stdout


def test_unusable_cache_dir_does_not_break_import_or_calls(tmp_path):
    """No writable cache location at all: NUMBA_CACHE_DIR under a regular file (so it
    cannot be created, even as root), a copy of the package whose __pycache__ dirs are
    files, and HOME/XDG_CACHE_HOME unusable too.  Import and calls must still work."""
    import shutil
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    pkg_root = tmp_path / "site"
    shutil.copytree(os.path.join(REPO, "fastbn"), pkg_root / "fastbn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("fastbn", "fastbn/cpu", "fastbn/cuda"):
        if (pkg_root / sub).is_dir():
            (pkg_root / sub / "__pycache__").write_text("")
    code = """
        import numpy as np, fastbn
        assert fastbn.__file__.startswith(%r), fastbn.__file__
        x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
        y, m, s = fastbn.batch_norm_forward(x)
        print(float(abs(y.mean())) < 1e-5, bool(np.isfinite(fastbn.batch_stats(x)[1]).all()))
    """ % str(pkg_root)
    env = {"NUMBA_CACHE_DIR": str(blocker / "cache"), "HOME": str(blocker / "home"),
           "XDG_CACHE_HOME": str(blocker / "xdg"), "PYTHONPATH": str(pkg_root),
           "PYTHONDONTWRITEBYTECODE": "1"}
    full_env = {k: v for k, v in os.environ.items() if k not in env}
    full_env.update(env)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True"], result.stdout


def test_missing_cache_dir_is_created(tmp_path):
    cache = tmp_path / "does" / "not" / "exist"
    result = _run_python("""
        import numpy as np, fastbn
        print(fastbn.batch_norm_forward(np.ones((4, 3), np.float32))[0].sum())
    """, env={"NUMBA_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) == 0.0

"""What the public functions accept, and how they refuse the rest (CPU backend).

Every bad argument must raise exactly ``ValueError`` or ``TypeError`` from fastbn itself
(never a Numba typing error) whose message names the argument, what was expected and
what came; the reference shares the checks.  The accepted side: weight and bias are
each optional, and eps/momentum/training take the scalar kinds users pass (numpy
scalars, ints, ``np.bool_``).

Tolerances.  ``y``/``dx`` use :func:`conftest._atol` (16 eps times the largest term);
``dx`` combines three terms (``dy``, its mean, ``x_hat`` times the mean of
``dy * x_hat``), so its magnitude is taken as ``3 * max|dx| + 3``.  ``dweight`` and
``dbias`` are float64 sums of 24 values on both sides, checked at 1e-10.  Equivalent scalar kinds are compared
exactly: they reach the kernels as the same float64 (``eps=1`` vs ``1.0``) or differ by
~5e-11 relative (``np.float32(1e-3)``), which leaves this fixed float32 ``y`` unchanged.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import LAYOUTS, B, F, S, _atol, _ref_backward, _ref_forward, _ro, _x


X = _x((4, 3, 5))
C3 = np.ones(3, np.float32)


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
    # int16 and uint16 are the kernels' views of bfloat16 and float16, never a public dtype.
    "x int16": (lambda: F(np.ones((4, 3), np.int16)), TypeError, ["x:", "float32 or float64", "int16"]),
    "x uint16": (lambda: F(np.ones((4, 3), np.uint16)), TypeError, ["x:", "float32 or float64", "uint16"]),
    "x big-endian": (lambda: F(np.ones((4, 3), ">f4")), TypeError, ["x:", ">f4"]),
    "x structured": (lambda: F(np.zeros((4, 3), [("a", "f4")])), TypeError, ["x:", "float32"]),
    "x masked": (lambda: F(np.ma.ones((4, 3), np.float32)), TypeError, ["x:", "masked"]),
    # Empty batches are valid in the public functions (tests/test_empty_batch.py), not in the stages.
    "x empty N": (lambda: fastbn.stages.moments(np.ones((0, 3), np.float32)), ValueError,
                  ["x:", "non-empty", "(0, 3)"]),
    "x empty spatial": (lambda: fastbn.stages.moments(np.ones((4, 3, 0, 2), np.float32)), ValueError,
                        ["x:", "non-empty"]),
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


# ---------------------------------------------------------------------------- accepted

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

"""``out=`` in every aliasing and memory-order case: ``out`` is ``x`` (in place), ``out``
overlaps ``x`` or ``dy`` only partly (the driver must go through a temporary, or it
reads values it has already overwritten), and ``out`` in channels-last, Fortran,
strided or negatively strided memory.

Tolerances: :func:`conftest._atol` (16 eps times the largest term) against the float64
reference; ``dx`` combines three terms (``dy``, its mean, ``x_hat`` times the mean of
``dy * x_hat``), so its magnitude is taken as ``3 * max|dx| + 3``.  A wrong read through an overlap gives O(1) errors, far above it.
"""

import numpy as np
import pytest

from _helpers import LAYOUTS, B, F, _atol, _ref_backward, _ref_forward, _x

# Serial small-tensor kernels and the parallel planes/rows kernels (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")


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

"""Edge shapes and 64-bit indexing.

Shapes at the kernels' boundaries: N=1 with planes longer than one work block, C=1,
65536 channels of 2 values each, rank 5 with wide channel-last rows, size-1 spatial
dims.  Past 2**31 elements every integer the kernels compute must be 64-bit: checked
cheaply and exactly on Numba's type map, and for real (opt-in, ~17 GiB) on a
2**31 + 64-element tensor.

Tolerances.  ``y``/``dx`` use :func:`conftest._atol` (16 eps times the largest term;
``dx`` combines three terms, hence the magnitude ``3 * max|dx| + 3``); the mean is
float64 on both sides (1e-10).  With two values per channel the variance can be tiny
next to the values, so invstd is compared at 1e-6.  The running statistics and
``dbias`` are stored in float32: 1e-6 and 1e-5 relative are float32 rounding (6e-8)
with a wide margin, the absolute terms cover values near zero.  The 2**31 test has
closed-form statistics (float64 counts are exact to 2**53), checked at 1e-12 (mean)
and 1e-9 (invstd), and its float32 ``y`` of magnitude ~1.4 at 1e-5.
"""

import os

import numpy as np
import pytest

from fastbn import reference

from _helpers import LAYOUTS, B, F, _atol, _ref_backward, _x

# Serial small-tensor kernels and the parallel planes/rows kernels (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")


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
    indices can wrap at 2**31.  The host's own sizes are Python ints and the partial
    counts float64 (exact to 2**53).
    """
    import numba
    from fastbn.cpu import channels, planes, rows, small

    saved = small.SMALL_SIZE
    try:
        for size in (saved, 0):  # 0: the parallel planes and rows kernels
            small.SMALL_SIZE = size
            for shape, layout in (((2, 3, 4, 5), "NCHW"), ((2, 4, 5, 3), "NHWC")):
                x = _x(shape)
                _, m, s = F(x, layout=layout)
                B(x, x, m, s, layout=layout)
    finally:
        small.SMALL_SIZE = saved
    kernels = [obj for mod in (planes, rows, channels, small) for obj in vars(mod).values()
               if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.signatures]
    assert len(kernels) >= 9
    from numba.core import compiler, typed_passes
    from numba.core.analysis import dead_branch_prune
    from numba.core.registry import cpu_target

    typingctx, targetctx = cpu_target.typing_context, cpu_target.target_context
    typingctx.refresh()
    targetctx.refresh()
    checked = 0
    for kernel in kernels:
        for signature in kernel.signatures:
            if any(getattr(arg, "dtype", None) in (numba.uint16, numba.int16) for arg in signature):
                continue  # 16-bit storage views: their elements are uint16/int16 data (fastbn.half)
            # Type inference only (overloads loaded from the disk cache carry no type map).
            func_ir = compiler.run_frontend(kernel.py_func)
            # As Numba's pipeline: branches on ``arg is None`` are pruned for the
            # signature first (the epilogue's optional arrays are None when absent).
            dead_branch_prune(func_ir, signature)
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

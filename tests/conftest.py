"""Shared test helpers: random inputs in either layout and dtype-derived tolerances."""

import numpy as np
import pytest

#: Unit roundoff of the float64 accumulators every kernel uses.
U64 = np.finfo(np.float64).eps / 2


def channel_axis(ndim, layout):
    return 1 if layout == "NCHW" else ndim - 1


def to_layout(shape_nchw, layout):
    """An NCHW-ordered shape written in ``layout``."""
    if layout == "NCHW" or len(shape_nchw) == 2:
        return tuple(shape_nchw)
    return (shape_nchw[0], *shape_nchw[2:], shape_nchw[1])


def elementwise_atol(dtype, magnitude):
    """Bound on |fastbn - reference| for y or dx, elementwise.

    The kernels compute ``(x - center) * scale + shift`` (dx: one more product term) in
    the input's dtype from float64 per-channel coefficients: rounding the coefficients to
    the dtype, the subtraction, the fused multiply-add(s) and the final store are at most
    6 roundings, each bounded by ``eps/2`` times an operand no larger than ``magnitude``
    (the largest |term| of the result, ~max|y| for standardized data).  Statistics errors
    (float64) are ~1e-12 relative and vanish next to float32 rounding; for float64 inputs
    they are covered by the same ``magnitude * 8 * eps`` margin.
    """
    return 8 * np.finfo(dtype).eps * magnitude


def stats_rtol(values_per_channel):
    """Relative bound on mean/var from float64 accumulation of ``n`` values.

    Recursive summation of n terms has relative error <= n * u (Higham, 4.3) of the sum
    of magnitudes; with shifted sums the magnitudes are the spread, so for well-scaled
    data var and mean carry <= ~2 n u.  Chan merges add O(u) each.
    """
    return 4 * max(values_per_channel, 16) * U64


@pytest.fixture
def rng():
    return np.random.default_rng(12345)

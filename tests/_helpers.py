"""Shared test helpers: random inputs in either layout, dtype-derived tolerances, and
the float64 reference run on float64 copies."""

import numpy as np

import fastbn
from fastbn import reference

LAYOUTS = ("NCHW", "NHWC")
DTYPES = (np.float32, np.float64)

#: Short names for the public functions, for tables of calls.
F = fastbn.batch_norm_forward
B = fastbn.batch_norm_backward
S = fastbn.batch_stats

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


def _atol(dtype, magnitude):
    """Elementwise bound on |fastbn - reference| for y or dx: ``16 * eps * magnitude``.

    Same derivation as :func:`elementwise_atol` (at most ~6 roundings in the input's
    dtype, each <= eps/2 times an operand no larger than ``magnitude``) with a further 2x
    margin.  ``magnitude`` is floored at 1: the data in these tests are standardized, so
    intermediate terms are O(1) even where the compared output is smaller.
    """
    return 16 * np.finfo(dtype).eps * max(float(magnitude), 1.0)


def _x(shape, dtype=np.float32, seed=0, offset=0.0):
    """Standard-normal data (plus ``offset``) in ``dtype``, reproducible from ``seed``."""
    return (np.random.default_rng(seed).standard_normal(shape) + offset).astype(dtype)


def _ro(a):
    """A read-only copy of ``a``."""
    a = a.copy()
    a.flags.writeable = False
    return a


def _ref_forward(x, *args, **kwargs):
    """The float64 reference on float64 copies (running stats are copied, not updated)."""
    cast = [None if a is None else np.array(a, dtype=np.float64) for a in args]
    for name in ("running_mean", "running_var"):
        if kwargs.get(name) is not None:
            kwargs[name] = np.array(kwargs[name], dtype=np.float64)
    with np.errstate(all="ignore"):  # NaN/Inf cases: the reference warns, fastbn does not
        return reference.batch_norm_forward(x.astype(np.float64), *cast, **kwargs)


def _ref_backward(dy, x, mean, invstd, weight=None, **kwargs):
    """The float64 reference backward on float64 copies of dy, x and weight."""
    w = None if weight is None else weight.astype(np.float64)
    with np.errstate(all="ignore"):
        return reference.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                             mean, invstd, w, **kwargs)

"""Helpers of the tests of layer, group and instance norm: data in either layout and the
comparison of a (y, mean, invstd) / (dx, dweight, dbias) pair of results with the float64
reference (tolerances from :mod:`_helpers`)."""

import numpy as np

from _helpers import elementwise_atol, stats_rtol


def channels_last(a):
    """An (N, C, ...) array as its contiguous channel-last (N, ..., C) copy (rank 2 as is)."""
    return a if a.ndim == 2 else np.ascontiguousarray(np.moveaxis(a, 1, -1))


def assert_close_to_reference(got, want, dtype, count):
    """Elementwise results (first) within :func:`elementwise_atol` of the largest |value|;
    statistics or parameter gradients within the float64 accumulation bound of ``count``
    values, relative to the largest |value| (gradients: float32 storage adds its eps)."""
    for index, (a, b) in enumerate(zip(got, want)):
        b = np.asarray(b, dtype=np.float64)
        magnitude = float(np.max(np.abs(b)))
        if index == 0:
            atol = elementwise_atol(dtype, max(magnitude, 1.0))
        else:
            atol = max(stats_rtol(count), np.finfo(a.dtype).eps * 4) * max(magnitude, 1.0) * 4
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), b, rtol=0, atol=atol)

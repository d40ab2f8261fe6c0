"""Mergeable statistics: the values that leave one pass over data and merge with others.

:class:`Moments` holds per-channel ``(count, mean, M2)`` (``M2`` the sum of squared
deviations from the mean), float64.  One pass over an array makes one
(:func:`fastbn.moments`); two merge into the moments of the union of their data
(:meth:`Moments.merge`, Chan et al.'s formula).  The same merge combines the blocks of one
call, the chunks of a dataset streamed from disk (:func:`stream_moments`) and the ranks of
a distributed job.

:class:`BackwardSums` holds the per-channel ``count``, ``sum(dy)`` and
``sum(dy * (x - mean))`` of the backward pass; they merge by addition.

Accuracy of the merge.  A merge is ``n = n_a + n_b``, ``delta = mean_b - mean_a``,
``mean = mean_a + delta * n_b / n`` and ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``,
in float64.  Every term of ``M2`` is non-negative, so a merge adds a relative error of at
most ~5 float64 roundoffs (u = 1.1e-16) to ``M2``, and ``mean`` an absolute error of ~2u
times ``max(|mean_a|, |mean_b|)``.  Merging P partials one after the other therefore keeps
``M2`` within ~5 P u relative of the exact value of the partials (1e-13 for P = 200),
and the mean within ~2 P u of the largest |mean|; a merge with a zero count returns the
other operand exactly.  Counts are float64, exact up to 2**53 values.

Both values hold arrays of the backend the data lives on: NumPy arrays on the host,
numba device arrays for CUDA input (their merges run there).
"""

import sys
from typing import NamedTuple

import numpy as np


class Moments(NamedTuple):
    """Per-channel ``(count, mean, M2)``, each a float64 array of shape (C,).

    ``count`` is the number of values behind each channel's statistics (0 for none),
    ``mean`` their mean and ``m2`` the sum of their squared deviations from it.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, num_channels):
        """The moments of no data: count, mean and M2 zero, shape (num_channels,)."""
        return cls(np.zeros(num_channels), np.zeros(num_channels), np.zeros(num_channels))

    @property
    def var(self):
        """Population (biased) variance ``M2 / count``, float64 (C,); NaN where count is 0."""
        return _backend_of(self).module.moments_var(self)

    def mean_var(self):
        """``(mean, var)``: the mean and the population variance, float64 (C,)."""
        return self.mean, self.var

    def invstd(self, eps):
        """``1 / sqrt(var + eps)``, float64 (C,)."""
        return _backend_of(self).module.moments_invstd(self, float(eps))

    def merge(self, *others):
        """The moments of the union of this data and ``others``' (merged in order).

        Deterministic: the same operands in the same order give bitwise the same result,
        whatever produced them.  Exact for any counts, zero included (see the module).
        """
        merged = self
        for other in others:
            _check_same_channels(merged, other)
            merged = _backend_of(merged, other).module.merge_moments(merged, other)
        return merged


class BackwardSums(NamedTuple):
    """Per-channel ``count``, ``sum_dy = sum(dy)`` and ``sum_dy_xmu = sum(dy * (x - mean))``,
    float64 arrays of shape (C,); merged by addition."""

    count: np.ndarray
    sum_dy: np.ndarray
    sum_dy_xmu: np.ndarray

    def merge(self, *others):
        """The sums over the union of this data and ``others``' (added in order)."""
        merged = self
        for other in others:
            _check_same_channels(merged, other)
            merged = _backend_of(merged, other).module.merge_sums(merged, other)
        return merged


def _backend_of(*values):
    from ._dispatch import select_backend  # the backends import this module

    return select_backend({f"{type(v).__name__}.{field}": getattr(v, field)
                                     for v in values for field in v._fields})


def _check_same_channels(a, b):
    if type(b) is not type(a):
        raise TypeError(f"merge: expected {type(a).__name__}, got {type(b).__name__}")
    if tuple(a[1].shape) != tuple(b[1].shape):
        raise ValueError(f"merge: expected {type(a).__name__} of shape {tuple(a[1].shape)} "
                         f"(one value per channel), got {tuple(b[1].shape)}")


def stream_moments(chunks, *, layout="NCHW", progress=False, total=None):
    """The :class:`Moments` of a dataset given as chunks, merged chunk by chunk.

    Parameters
    ----------
    chunks : iterable of arrays (each as :func:`fastbn.moments` takes: rank 2-5, float32
        or float64, any strides; e.g. slices of a ``numpy.memmap`` or batches from a
        generator), all with the same number of channels.  Only one chunk is held at a
        time.
    layout : "NCHW" or "NHWC", the layout of every chunk.
    progress : bool; when True a progress line is written to stderr, with a bar when the
        number of chunks is known (``len(chunks)`` or ``total``).
    total : optional number of chunks, for the progress bar of an iterator.

    Returns
    -------
    Moments of all the chunks' data: equal to the one-shot moments of their
    concatenation to float64 rounding (see the module's accuracy note).
    """
    from .stages import moments  # the public, checked stage

    if total is None and hasattr(chunks, "__len__"):
        total = len(chunks)
    merged = None
    done = 0
    for chunk in chunks:
        part = moments(chunk, layout=layout)
        merged = part if merged is None else merged.merge(part)
        done += 1
        if progress:
            _show_progress(done, total)
    if progress:
        sys.stderr.write("\n")
    if merged is None:
        raise ValueError("chunks: expected at least one chunk, got none")
    return merged


def _show_progress(done, total, width=30):
    if total:
        filled = min(width, width * done // total)
        line = f"moments [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    else:
        line = f"moments: {done} chunks"
    sys.stderr.write("\r" + line)
    sys.stderr.flush()

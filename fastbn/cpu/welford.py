"""Per-chunk moments and Chan's merge, shared by the NCHW and NHWC statistics kernels.

A chunk's moments come from sums shifted by one of its own values (``k``):
``mean = k + S1/n`` and ``M2 = S2 - S1**2/n`` with ``S1 = sum(x - k)``,
``S2 = sum((x - k)**2)`` accumulated in float64.  Shifting by a value of the data keeps
the terms the size of the spread, not of the mean, so there is no catastrophic
cancellation (unlike E[x^2] - E[x]^2 on raw values), and the plain sums vectorize where
a per-element Welford update (a division per value) would not.  Chunks are then merged
with Chan et al.'s parallel formula, in a fixed order, so results are deterministic.
"""

from numba import prange

from ._jit import inline_helper, parallel_kernel


@inline_helper
def shifted_moments(k, s1, s2, n):
    """(mean, M2) of ``n`` values from their sums shifted by ``k``."""
    mean_shift = s1 / n
    m2 = s2 - s1 * mean_shift
    if m2 < 0.0:  # rounding only; written as a comparison so a NaN stays NaN
        m2 = 0.0
    return k + mean_shift, m2


@inline_helper
def welford_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's merge of two (count, mean, M2) partials into one."""
    n = n_a + n_b
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    if n_a == 0.0:
        return n_b, mean_b, m2_b
    delta = mean_b - mean_a
    frac_b = n_b / n
    return n, mean_a + delta * frac_b, m2_a + m2_b + delta * delta * (n_a * frac_b)


@parallel_kernel
def merge_partials(counts, part_mean, part_m2, mean, var):
    """Merge per-chunk partials into per-channel mean and biased variance.

    counts: (P,) float64, values in each partial; part_mean, part_m2: (C, P) float64;
    mean, var: (C,) float64 outputs.
    """
    num_channels, num_parts = part_mean.shape
    for c in prange(num_channels):
        n, m, m2 = 0.0, 0.0, 0.0
        for p in range(num_parts):
            n, m, m2 = welford_merge(n, m, m2, counts[p], part_mean[c, p], part_m2[c, p])
        mean[c] = m
        var[c] = m2 / n

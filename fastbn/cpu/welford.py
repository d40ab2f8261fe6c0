"""Per-chunk moments and Chan's merge, shared by the NCHW and NHWC statistics kernels.

A chunk's moments come from sums shifted by a value of the data (``k``):
``mean = k + S1/n`` and ``M2 = S2 - S1**2/n`` with ``S1 = sum(x - k)``,
``S2 = sum((x - k)**2)`` accumulated in float64.  Shifting by a value of the data keeps
the terms the size of the spread, not of the mean, so there is no catastrophic
cancellation (unlike E[x^2] - E[x]^2 on raw values), and the plain sums vectorize where
a per-element Welford update (a division per value) would not.  Chunks are then merged
with Chan et al.'s parallel formula, in a fixed order, so results are deterministic.
"""

from numba import prange

from ._jit import inline_helper, parallel_kernel

#: Channels per work item of the merge.
MERGE_BLOCK = 256


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

    counts: (P,) float64, values per channel in each partial (the same for every
    channel); part_mean, part_m2: (P, C) float64; mean, var: (C,) float64 outputs.
    Partials are merged in order p = 0, 1, ...; the channel loop is the inner, vector one.
    """
    num_parts, num_channels = part_mean.shape
    for blk in prange((num_channels + MERGE_BLOCK - 1) // MERGE_BLOCK):
        c0 = blk * MERGE_BLOCK
        width = min(MERGE_BLOCK, num_channels - c0)
        m = mean[c0:c0 + width]
        m2 = var[c0:c0 + width]
        first = part_mean[0, c0:c0 + width]
        first_m2 = part_m2[0, c0:c0 + width]
        for c in range(width):
            m[c] = first[c]
            m2[c] = first_m2[c]
        n = counts[0]
        for p in range(1, num_parts):
            n_b = counts[p]
            if n_b == 0.0:
                continue
            total = n + n_b
            frac_b = n_b / total
            weight = n * frac_b
            pm = part_mean[p, c0:c0 + width]
            p2 = part_m2[p, c0:c0 + width]
            for c in range(width):
                delta = pm[c] - m[c]
                m[c] += delta * frac_b
                m2[c] += p2[c] + delta * delta * weight
            n = total
        for c in range(width):
            m2[c] = m2[c] / n

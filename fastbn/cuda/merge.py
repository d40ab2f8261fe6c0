"""Reductions within a block, and the per-channel merge of the blocks' partials.

Each thread accumulates sums shifted by its own first value (``pivot``), in the
accumulate dtype: ``s1 = sum(x - pivot)``, ``s2 = sum((x - pivot)**2)``, turned into the
thread's float64 ``(count, mean, M2)`` by :func:`fastbn.algebra.shifted_moments` (no
division per value, as a per-element Welford update would need).  Thread partials are
merged with :func:`fastbn.algebra.chan_merge`: within a warp by ``shfl_down_sync``,
across the warps of a block through shared memory, and across the blocks of a channel
by the last of them to finish (:func:`finished_last`, :func:`merge_channel_partials`).
Every merge order is fixed, so results are deterministic.
Merges run in float64 whatever the accumulator: they are a few operations per thread,
and float64 partials keep the cross-block merge exact enough for float32 accumulation
(float16 inputs) too.  The backward sums reduce the same way, by addition.
"""

import numpy as np
from numba import cuda

from ..algebra import chan_merge, shifted_moments
from .config import MAX_THREADS_PER_BLOCK, WARP_SIZE

FULL_MASK = 0xFFFFFFFF
#: Shared-memory slots for one value per warp of a block.
MAX_WARPS = MAX_THREADS_PER_BLOCK // WARP_SIZE


@cuda.jit(device=True)
def thread_partial(pivot, s1, s2, n):
    """A thread's float64 (mean, M2) from its sums shifted by ``pivot`` over ``n``
    values (accumulate dtype); (0, 0) when it had none (its count, 0, makes it neutral
    in the merges).  The algebra runs in float64, so float32 sums lose nothing more."""
    if n == 0:
        return 0.0, 0.0
    return shifted_moments(np.float64(pivot), np.float64(s1), np.float64(s2), np.float64(n))


@cuda.jit(device=True)
def warp_merge(n, mean, m2):
    """Chan-merge the float64 (n, mean, M2) of the 32 lanes of a warp; lane 0 gets the total.

    Every lane must call it (full warps).  Lane ``l`` merges lane ``l + offset`` for
    offsets 16, 8, 4, 2, 1; lanes past the warp read their own value, but those lanes
    never feed lane 0.
    """
    offset = WARP_SIZE // 2
    while offset > 0:
        n_b = cuda.shfl_down_sync(FULL_MASK, n, offset)
        mean_b = cuda.shfl_down_sync(FULL_MASK, mean, offset)
        m2_b = cuda.shfl_down_sync(FULL_MASK, m2, offset)
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
        offset //= 2
    return n, mean, m2


@cuda.jit(device=True)
def block_merge(n, mean, m2, shared_n, shared_mean, shared_m2):
    """Chan-merge float64 (n, mean, M2) over a 1-D block; thread 0 gets the total.

    ``shared_*``: float64 shared arrays of at least :data:`MAX_WARPS` slots.  Every
    thread of the block must call it (it synchronizes the block).
    """
    lane = cuda.threadIdx.x % WARP_SIZE
    warp = cuda.threadIdx.x // WARP_SIZE
    n, mean, m2 = warp_merge(n, mean, m2)
    if cuda.blockDim.x == WARP_SIZE:
        return n, mean, m2
    if lane == 0:
        shared_n[warp] = n
        shared_mean[warp] = mean
        shared_m2[warp] = m2
    cuda.syncthreads()
    if warp == 0:
        if lane < cuda.blockDim.x // WARP_SIZE:
            n = shared_n[lane]
            mean = shared_mean[lane]
            m2 = shared_m2[lane]
        else:
            n = 0.0
            mean = 0.0
            m2 = 0.0
        n, mean, m2 = warp_merge(n, mean, m2)
    return n, mean, m2


@cuda.jit(device=True)
def warp_sum2(a, b):
    """Sum two float64 values over the 32 lanes of a warp; lane 0 gets the totals."""
    offset = WARP_SIZE // 2
    while offset > 0:
        a += cuda.shfl_down_sync(FULL_MASK, a, offset)
        b += cuda.shfl_down_sync(FULL_MASK, b, offset)
        offset //= 2
    return a, b


@cuda.jit(device=True)
def block_sum2(a, b, shared_a, shared_b):
    """Sum two float64 values over a 1-D block; thread 0 gets the totals (see :func:`block_merge`)."""
    lane = cuda.threadIdx.x % WARP_SIZE
    warp = cuda.threadIdx.x // WARP_SIZE
    a, b = warp_sum2(a, b)
    if cuda.blockDim.x == WARP_SIZE:
        return a, b
    if lane == 0:
        shared_a[warp] = a
        shared_b[warp] = b
    cuda.syncthreads()
    if warp == 0:
        if lane < cuda.blockDim.x // WARP_SIZE:
            a = shared_a[lane]
            b = shared_b[lane]
        else:
            a = 0.0
            b = 0.0
        a, b = warp_sum2(a, b)
    return a, b


@cuda.jit(device=True)
def column_merge(n, mean, m2, shared_n, shared_mean, shared_m2):
    """Chan-merge float64 (n, mean, M2) over ``threadIdx.y`` of a 2-D block, separately
    for each ``threadIdx.x`` (a channel); threads with ``threadIdx.y == 0`` get the totals.

    Lanes of a warp hold different channels here, so the merge is a pairwise tree in
    shared memory (``MAX_THREADS_PER_BLOCK`` float64 slots each).  Every thread calls it.
    """
    slot = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    shared_n[slot] = n
    shared_mean[slot] = mean
    shared_m2[slot] = m2
    cuda.syncthreads()
    active = cuda.blockDim.y
    while active > 1:
        half = (active + 1) // 2
        if cuda.threadIdx.y < active - half:
            other = slot + half * cuda.blockDim.x
            n, mean, m2 = chan_merge(shared_n[slot], shared_mean[slot], shared_m2[slot],
                                     shared_n[other], shared_mean[other], shared_m2[other])
            shared_n[slot] = n
            shared_mean[slot] = mean
            shared_m2[slot] = m2
        cuda.syncthreads()
        active = half
    return shared_n[slot], shared_mean[slot], shared_m2[slot]


@cuda.jit(device=True)
def column_sum2(a, b, shared_a, shared_b):
    """Sum two float64 values over ``threadIdx.y`` per ``threadIdx.x`` (see :func:`column_merge`)."""
    slot = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    shared_a[slot] = a
    shared_b[slot] = b
    cuda.syncthreads()
    active = cuda.blockDim.y
    while active > 1:
        half = (active + 1) // 2
        if cuda.threadIdx.y < active - half:
            other = slot + half * cuda.blockDim.x
            shared_a[slot] += shared_a[other]
            shared_b[slot] += shared_b[other]
        cuda.syncthreads()
        active = half
    return shared_a[slot], shared_b[slot]


@cuda.jit(device=True)
def finished_last(counters, slot, expected, flag):
    """True, in every thread of the block, when this block is the last of ``expected``
    blocks sharing ``counters[slot]`` to finish; that block also sets the counter back
    to 0 for the next call.  Every thread must call it, after its block's partials are
    written: thread 0 fences them (visible to the whole grid) before taking a ticket, so
    the last block sees every other block's partials.  ``flag``: an int32 shared array."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
        cuda.threadfence()
        ticket = cuda.atomic.add(counters, slot, 1)
        flag[0] = 0
        if ticket == expected - 1:
            counters[slot] = 0
            flag[0] = 1
    cuda.syncthreads()
    return flag[0] == 1


@cuda.jit(device=True)
def merge_channel_partials(c, part_n, part_mean, part_m2, first, step):
    """This thread's chan-merge of channel ``c``'s partials ``first, first + step, ...``
    (fixed order: deterministic)."""
    n = 0.0
    m = 0.0
    s = 0.0
    p = first
    while p < part_n.shape[1]:
        n, m, s = chan_merge(n, m, s, part_n[c, p], part_mean[c, p], part_m2[c, p])
        p += step
    return n, m, s


@cuda.jit(device=True)
def sum_channel_partials(c, part_a, part_b, first, step):
    """This thread's sums of channel ``c``'s partials ``first, first + step, ...``."""
    a = 0.0
    b = 0.0
    p = first
    while p < part_a.shape[1]:
        a += part_a[c, p]
        b += part_b[c, p]
        p += step
    return a, b

"""Kernels of the planes family: ``x`` as a flat C-contiguous (N, C, S) buffer
(:data:`fastbn.geometry.PLANES`: ``outer`` N, ``kept`` C, ``inner`` S).

Element ``(n, c, s)`` is at ``(n * C + c) * S + s``.  Channel ``c``'s values are
numbered ``j = n * S + s`` (``0 <= j < N * S``).

Reductions run on a grid of ``(C, blocks_per_channel)`` 1-D blocks: block ``(c, b)``
reduces values ``j`` in ``[b * chunk, (b + 1) * chunk)`` of channel ``c``, consecutive
threads on consecutive ``j`` (consecutive addresses within a plane, so loads
coalesce), and writes one float64 partial per block; a second kernel
(:mod:`fastbn.cuda.merge`) merges a channel's partials.  Splitting each channel over
several blocks fills the GPU when there are few channels with many values
((256, 3, 224, 224)); with many small channels ((256, 2048, 7, 7)) one block per
channel already does.  A thread advances ``j`` by the block size and carries the offset
``s`` in the plane and the flat index along with a subtraction loop instead of an
integer division and two multiplications per value, in 32-bit indices below 2**31
elements (as the elementwise kernels, :mod:`fastbn.cuda.loadstore`).  16-bit storage
whose planes have an even size and whose buffers start 4-byte aligned is reduced in
``uint32`` words, two values per load (``paired``; the launcher decides).

Kernels are compiled per storage dtype (:func:`planes_kernels`), accumulating and
computing in the dtypes of its :mod:`fastbn.dtypes` policy.
"""

import collections
import functools

import numpy as np
from numba import cuda

from ..half import widen
from .arrays import policy_of
from .loadstore import index_type, pair_codec
from .channels import finish_moments, finish_sums
from .merge import (MAX_WARPS, block_merge, block_sum2, finished_last, merge_channel_partials, sum_channel_partials,
                    thread_partial)

#: The reduction kernels of one family, compiled for one storage dtype (the elementwise
#: kernels serve both families: :mod:`fastbn.cuda.elementwise`).
FamilyKernels = collections.namedtuple("FamilyKernels", ["moments", "backward_sums"])


@functools.cache
def planes_kernels(dtype, wide_index=False, paired=False):
    """The planes kernels (a :class:`FamilyKernels`) for storage (kernel-view) ``dtype``,
    indexing in int64 when ``wide_index``, else uint32 (:mod:`fastbn.cuda.loadstore`).
    ``paired`` (16-bit storage): ``x`` and ``dy`` are the ``uint32`` words of planes of
    even size, two values per load, and ``plane_size`` counts words."""
    policy = policy_of(dtype)
    acc = policy.accumulate.type
    index = index_type(wide_index)
    span = 2 if paired else 1
    low, high, _ = pair_codec(dtype) if paired else (None, None, None)

    @cuda.jit(device=True)
    def first_of(x, i):
        """The first value of unit ``i`` (the thread's pivot)."""
        if paired:
            return acc(low(x[i]))
        return acc(widen(x[i]))

    @cuda.jit(device=True)
    def add_moments(x, i, pivot, s1, s2):
        """The shifted sums with unit ``i``'s values added."""
        if paired:
            word = x[i]
            d0 = acc(low(word)) - pivot
            d1 = acc(high(word)) - pivot
            return s1 + d0 + d1, s2 + d0 * d0 + d1 * d1
        d = acc(widen(x[i])) - pivot
        return s1 + d, s2 + d * d

    @cuda.jit(device=True)
    def add_sums(dy, x, i, m, s1, s2):
        """sum(dy) and sum(dy * (x - m)) with unit ``i``'s values added."""
        if paired:
            g, a = dy[i], x[i]
            g0 = acc(low(g))
            g1 = acc(high(g))
            return s1 + g0 + g1, s2 + g0 * (acc(low(a)) - m) + g1 * (acc(high(a)) - m)
        g = acc(widen(dy[i]))
        return s1 + g, s2 + g * (acc(widen(x[i])) - m)

    @cuda.jit(device=True)
    def first_value(size, num_channels, plane_size, chunk):
        """Where this thread of block ``(c, b)`` starts: ``(j, end, step, s, i, jump,
        plane)``: its first value ``j`` of the channel, the block's end, the block size,
        the offset ``s`` in the plane, the flat index ``i``, the index jump from the end of
        one of the channel's planes to the next one's start, ``(C - 1) * S``, and ``S``,
        all in the index type (the thread's one division)."""
        channels = index(num_channels)
        plane = index(plane_size)
        count = index(index(size) // channels)
        end = index(index(cuda.blockIdx.y + 1) * index(chunk))
        if end > count:  # not min(): numba 0.68's CUDA target fails to type min(int, int)
            end = count
        j = index(index(cuda.blockIdx.y) * index(chunk) + index(cuda.threadIdx.x))
        n = index(j // plane)
        s = index(j - n * plane)
        i = index(index(n * channels + index(cuda.blockIdx.x)) * plane + s)
        return j, end, index(cuda.blockDim.x), s, i, index((channels - index(1)) * plane), plane

    @cuda.jit
    def planes_moments(x, num_channels, plane_size, chunk, part_n, part_mean, part_m2, counters,
                       out_n, out_mean, out_m2,
                       finalize, weight, bias, use_weight, use_bias, eps, big, momentum, running_mean, running_var,
                       update_running, save_mean, save_invstd, center, scale, shift):
        """Per-channel (count, mean, M2) into ``out_*`` (C,) float64: per-block partials
        into ``part_*`` (C, P), merged by the channel's last block to finish."""
        flag = cuda.shared.array(1, np.int32)
        shared_n = cuda.shared.array(MAX_WARPS, np.float64)
        shared_mean = cuda.shared.array(MAX_WARPS, np.float64)
        shared_m2 = cuda.shared.array(MAX_WARPS, np.float64)
        c = cuda.blockIdx.x
        b = cuda.blockIdx.y
        j, end, step, s, i, jump, plane = first_value(x.size, num_channels, plane_size, chunk)
        pivot = acc(0)
        s1 = acc(0)
        s2 = acc(0)
        values = 0
        if j < end:
            pivot = first_of(x, i)
        while j < end:
            s1, s2 = add_moments(x, i, pivot, s1, s2)
            values += span
            j = index(j + step)
            s = index(s + step)
            i = index(i + step)
            while s >= plane:  # into the next sample's plane of channel c
                s = index(s - plane)
                i = index(i + jump)
        mean, m2 = thread_partial(pivot, s1, s2, values)
        total, mean, m2 = block_merge(np.float64(values), mean, m2, shared_n, shared_mean, shared_m2)
        if cuda.gridDim.y == 1:  # one block per channel: its result is the channel's
            if cuda.threadIdx.x == 0:
                finish_moments(c, total, mean, m2, out_n, out_mean, out_m2, finalize, weight, bias, use_weight,
                               use_bias, eps, big, momentum, running_mean, running_var, update_running, save_mean,
                               save_invstd, center, scale, shift)
            return
        if cuda.threadIdx.x == 0:
            part_n[c, b] = total
            part_mean[c, b] = mean
            part_m2[c, b] = m2
        if finished_last(counters, c, cuda.gridDim.y, flag):
            total, mean, m2 = merge_channel_partials(c, part_n, part_mean, part_m2, cuda.threadIdx.x,
                                                     cuda.blockDim.x)
            total, mean, m2 = block_merge(total, mean, m2, shared_n, shared_mean, shared_m2)
            if cuda.threadIdx.x == 0:
                finish_moments(c, total, mean, m2, out_n, out_mean, out_m2, finalize, weight, bias, use_weight,
                               use_bias, eps, big, momentum, running_mean, running_var, update_running, save_mean,
                               save_invstd, center, scale, shift)

    @cuda.jit
    def planes_backward_sums(dy, x, mean, num_channels, plane_size, chunk, part_sum_dy, part_sum_dy_xmu, counters,
                             out_count, out_sum_dy, out_sum_dy_xmu,
                             finalize, invstd, weight, use_weight, training, big, dweight, dbias, center, dy_scale,
                             x_scale, shift):
        """Per-channel count, sum(dy) and sum(dy * (x - mean[c])) into ``out_*`` (C,)
        float64: per-block partials (C, P), added by the channel's last block to finish."""
        flag = cuda.shared.array(1, np.int32)
        shared_a = cuda.shared.array(MAX_WARPS, np.float64)
        shared_b = cuda.shared.array(MAX_WARPS, np.float64)
        c = cuda.blockIdx.x
        b = cuda.blockIdx.y
        count = span * (x.size // num_channels)
        j, end, step, s, i, jump, plane = first_value(x.size, num_channels, plane_size, chunk)
        m = acc(mean[c])
        s1 = acc(0)
        s2 = acc(0)
        while j < end:
            s1, s2 = add_sums(dy, x, i, m, s1, s2)
            j = index(j + step)
            s = index(s + step)
            i = index(i + step)
            while s >= plane:
                s = index(s - plane)
                i = index(i + jump)
        sum_dy, sum_dy_xmu = block_sum2(np.float64(s1), np.float64(s2), shared_a, shared_b)
        if cuda.gridDim.y == 1:
            if cuda.threadIdx.x == 0:
                finish_sums(c, count, sum_dy, sum_dy_xmu, out_count, out_sum_dy, out_sum_dy_xmu, finalize, mean,
                            invstd, weight, use_weight, training, big, dweight, dbias, center, dy_scale, x_scale,
                            shift)
            return
        if cuda.threadIdx.x == 0:
            part_sum_dy[c, b] = sum_dy
            part_sum_dy_xmu[c, b] = sum_dy_xmu
        if finished_last(counters, c, cuda.gridDim.y, flag):
            sum_dy, sum_dy_xmu = sum_channel_partials(c, part_sum_dy, part_sum_dy_xmu, cuda.threadIdx.x,
                                                      cuda.blockDim.x)
            sum_dy, sum_dy_xmu = block_sum2(sum_dy, sum_dy_xmu, shared_a, shared_b)
            if cuda.threadIdx.x == 0:
                finish_sums(c, count, sum_dy, sum_dy_xmu, out_count, out_sum_dy, out_sum_dy_xmu, finalize, mean,
                            invstd, weight, use_weight, training, big, dweight, dbias, center, dy_scale, x_scale,
                            shift)

    return FamilyKernels(planes_moments, planes_backward_sums)

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
channel already does.  A thread advances ``j`` by the block size and carries ``(n, s)``
along with a subtraction loop instead of an integer division per value.

Kernels are compiled per storage dtype (:func:`planes_kernels`), accumulating and
computing in the dtypes of its :mod:`fastbn.dtypes` policy.
"""

import collections
import functools

import numpy as np
from numba import cuda

from ..half import widen
from .arrays import policy_of
from .channels import finish_moments, finish_sums
from .merge import (MAX_WARPS, block_merge, block_sum2, finished_last, merge_channel_partials, sum_channel_partials,
                    thread_partial)

#: The reduction kernels of one family, compiled for one storage dtype (the elementwise
#: kernels serve both families: :mod:`fastbn.cuda.elementwise`).
FamilyKernels = collections.namedtuple("FamilyKernels", ["moments", "backward_sums"])


@functools.cache
def planes_kernels(dtype):
    """The planes kernels (a :class:`FamilyKernels`) for storage ``dtype``."""
    policy = policy_of(dtype)
    acc = policy.accumulate.type

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
        count = x.size // num_channels
        end = (b + 1) * chunk
        if end > count:  # not min(): numba 0.68's CUDA target fails to type min(int, int)
            end = count
        j = b * chunk + cuda.threadIdx.x
        step = cuda.blockDim.x
        n = j // plane_size
        s = j - n * plane_size
        pivot = acc(0)
        s1 = acc(0)
        s2 = acc(0)
        values = 0
        if j < end:
            pivot = acc(widen(x[(n * num_channels + c) * plane_size + s]))
        while j < end:
            d = acc(widen(x[(n * num_channels + c) * plane_size + s])) - pivot
            s1 += d
            s2 += d * d
            values += 1
            j += step
            s += step
            while s >= plane_size:
                s -= plane_size
                n += 1
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
        count = x.size // num_channels
        end = (b + 1) * chunk
        if end > count:  # not min(): numba 0.68's CUDA target fails to type min(int, int)
            end = count
        j = b * chunk + cuda.threadIdx.x
        step = cuda.blockDim.x
        n = j // plane_size
        s = j - n * plane_size
        m = acc(mean[c])
        s1 = acc(0)
        s2 = acc(0)
        while j < end:
            i = (n * num_channels + c) * plane_size + s
            g = acc(widen(dy[i]))
            s1 += g
            s2 += g * (acc(widen(x[i])) - m)
            j += step
            s += step
            while s >= plane_size:
                s -= plane_size
                n += 1
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

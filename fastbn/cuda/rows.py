"""Kernels of the rows family: ``x`` as a flat C-contiguous (M, C) buffer of rows
(:data:`fastbn.geometry.ROWS`: ``outer`` M, ``kept`` C).

Element ``(r, c)`` is at ``r * C + c``.

Reductions run on 2-D blocks of ``lanes x rows_in_block`` threads: ``threadIdx.x`` is a
channel lane, ``threadIdx.y`` a row lane.  Consecutive threads of a warp read
consecutive channels of a row (coalesced loads); with fewer than 32 channels a warp
spans several consecutive rows, which are contiguous too, so no lane idles for lack of
channels (``lanes`` is the power of two >= C, at most 32).  The grid is
``(ceil(C / lanes), row_blocks)``: block ``(bx, b)`` reduces rows
``[b * rows_per_block, (b + 1) * rows_per_block)`` of channels ``bx * lanes + x``.
Threads of a channel are merged with a shared-memory tree over ``threadIdx.y`` (warp
shuffles would merge different channels here) and each block writes one float64
partial per channel, merged by a second kernel as for planes.

Kernels are compiled per storage dtype (:func:`rows_kernels`) and index width: a thread
carries its flat index from row to row by one addition, in 32-bit indices below 2**31
elements (:mod:`fastbn.cuda.loadstore`).  16-bit storage with an even number of channels
and buffers starting 4-byte aligned is reduced in ``uint32`` words: each thread reads
two neighbouring channels per load and keeps their sums apart.
"""

import functools

import numpy as np
from numba import cuda

from ..half import widen
from .arrays import policy_of
from .loadstore import index_type, pair_codec
from .config import MAX_THREADS_PER_BLOCK
from .channels import finish_moments, finish_sums
from .merge import (column_merge, column_sum2, finished_last, merge_channel_partials, sum_channel_partials,
                    thread_partial)
from .planes import FamilyKernels


@functools.cache
def rows_kernels(dtype, wide_index=False, paired=False):
    """The rows kernels (a :class:`~fastbn.cuda.planes.FamilyKernels`) for storage
    (kernel-view) ``dtype``, indexing in int64 when ``wide_index``, else uint32;
    ``paired`` (16-bit storage, an even number of channels): over ``uint32`` words of two
    channels each, ``num_channels`` counting words."""
    policy = policy_of(dtype)
    acc = policy.accumulate.type
    index = index_type(wide_index)

    @cuda.jit(device=True)
    def first_row(num_channels, rows_per_block):
        """``(r, i, row_step)`` of this thread: its first row, the flat index of its value
        there, and the index step between its rows, in the index type."""
        channels = index(num_channels)
        r = index(index(cuda.blockIdx.y) * index(rows_per_block) + index(cuda.threadIdx.y))
        c = index(index(cuda.blockIdx.x) * index(cuda.blockDim.x) + index(cuda.threadIdx.x))
        return r, index(r * channels + c), index(index(cuda.blockDim.y) * channels)

    @cuda.jit
    def rows_moments(x, num_channels, rows_per_block, part_n, part_mean, part_m2, counters, out_n, out_mean, out_m2,
                       finalize, weight, bias, use_weight, use_bias, eps, big, momentum, running_mean, running_var,
                       update_running, save_mean, save_invstd, center, scale, shift):
        """Per-channel (count, mean, M2) into ``out_*`` (C,) float64: per-block partials
        (C, P), merged by the last block of the channel block to finish."""
        flag = cuda.shared.array(1, np.int32)
        shared_n = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        shared_mean = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        shared_m2 = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        b = cuda.blockIdx.y
        num_rows = x.size // num_channels
        end = (b + 1) * rows_per_block
        if end > num_rows:  # not min(): numba 0.68's CUDA target fails to type min(int, int)
            end = num_rows
        r, i, row_step = first_row(num_channels, rows_per_block)
        last = index(end)
        pivot = acc(0)
        s1 = acc(0)
        s2 = acc(0)
        values = 0
        if c < num_channels:
            if r < last:
                pivot = acc(widen(x[i]))
            while r < last:
                d = acc(widen(x[i])) - pivot
                s1 += d
                s2 += d * d
                values += 1
                r = index(r + index(cuda.blockDim.y))
                i = index(i + row_step)
        mean, m2 = thread_partial(pivot, s1, s2, values)
        total, mean, m2 = column_merge(np.float64(values), mean, m2, shared_n, shared_mean, shared_m2)
        if cuda.gridDim.y == 1:  # one block per channel block: its results are final
            if cuda.threadIdx.y == 0 and c < num_channels:
                finish_moments(c, total, mean, m2, out_n, out_mean, out_m2, finalize, weight, bias, use_weight,
                               use_bias, eps, big, momentum, running_mean, running_var, update_running, save_mean,
                               save_invstd, center, scale, shift)
            return
        if cuda.threadIdx.y == 0 and c < num_channels:
            part_n[c, b] = total
            part_mean[c, b] = mean
            part_m2[c, b] = m2
        if finished_last(counters, cuda.blockIdx.x, cuda.gridDim.y, flag):
            total = 0.0
            mean = 0.0
            m2 = 0.0
            if c < num_channels:
                total, mean, m2 = merge_channel_partials(c, part_n, part_mean, part_m2, cuda.threadIdx.y,
                                                         cuda.blockDim.y)
            cuda.syncthreads()  # column_merge reuses the shared slots
            total, mean, m2 = column_merge(total, mean, m2, shared_n, shared_mean, shared_m2)
            if cuda.threadIdx.y == 0 and c < num_channels:
                finish_moments(c, total, mean, m2, out_n, out_mean, out_m2, finalize, weight, bias, use_weight,
                               use_bias, eps, big, momentum, running_mean, running_var, update_running, save_mean,
                               save_invstd, center, scale, shift)

    @cuda.jit
    def rows_backward_sums(dy, x, mean, num_channels, rows_per_block, part_sum_dy, part_sum_dy_xmu, counters,
                           out_count, out_sum_dy, out_sum_dy_xmu,
                             finalize, invstd, weight, use_weight, training, big, dweight, dbias, center, dy_scale,
                             x_scale, shift):
        """Per-channel count, sum(dy) and sum(dy * (x - mean[c])) into ``out_*`` (C,)
        float64: per-block partials (C, P), added by the channel block's last block."""
        flag = cuda.shared.array(1, np.int32)
        shared_a = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        shared_b = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        b = cuda.blockIdx.y
        num_rows = x.size // num_channels
        end = (b + 1) * rows_per_block
        if end > num_rows:  # not min(): numba 0.68's CUDA target fails to type min(int, int)
            end = num_rows
        r, i, row_step = first_row(num_channels, rows_per_block)
        last = index(end)
        s1 = acc(0)
        s2 = acc(0)
        if c < num_channels:
            m = acc(mean[c])
            while r < last:
                g = acc(widen(dy[i]))
                s1 += g
                s2 += g * (acc(widen(x[i])) - m)
                r = index(r + index(cuda.blockDim.y))
                i = index(i + row_step)
        sum_dy, sum_dy_xmu = column_sum2(np.float64(s1), np.float64(s2), shared_a, shared_b)
        if cuda.gridDim.y == 1:
            if cuda.threadIdx.y == 0 and c < num_channels:
                finish_sums(c, num_rows, sum_dy, sum_dy_xmu, out_count, out_sum_dy, out_sum_dy_xmu, finalize, mean,
                            invstd, weight, use_weight, training, big, dweight, dbias, center, dy_scale, x_scale,
                            shift)
            return
        if cuda.threadIdx.y == 0 and c < num_channels:
            part_sum_dy[c, b] = sum_dy
            part_sum_dy_xmu[c, b] = sum_dy_xmu
        if finished_last(counters, cuda.blockIdx.x, cuda.gridDim.y, flag):
            sum_dy = 0.0
            sum_dy_xmu = 0.0
            if c < num_channels:
                sum_dy, sum_dy_xmu = sum_channel_partials(c, part_sum_dy, part_sum_dy_xmu, cuda.threadIdx.y,
                                                          cuda.blockDim.y)
            cuda.syncthreads()  # column_sum2 reuses the shared slots
            sum_dy, sum_dy_xmu = column_sum2(sum_dy, sum_dy_xmu, shared_a, shared_b)
            if cuda.threadIdx.y == 0 and c < num_channels:
                finish_sums(c, num_rows, sum_dy, sum_dy_xmu, out_count, out_sum_dy, out_sum_dy_xmu, finalize, mean,
                            invstd, weight, use_weight, training, big, dweight, dbias, center, dy_scale, x_scale,
                            shift)

    if not paired:
        return FamilyKernels(rows_moments, rows_backward_sums)
    low, high, _ = pair_codec(dtype)

    @cuda.jit
    def rows_moments_pairs(x, num_words, rows_per_block, part_n, part_mean, part_m2, counters, out_n, out_mean,
                           out_m2, finalize, weight, bias, use_weight, use_bias, eps, big, momentum, running_mean,
                           running_var, update_running, save_mean, save_invstd, center, scale, shift):
        """:func:`rows_moments` over ``uint32`` words of two channels each (``x``: the
        (M, C / 2) words of an (M, C) buffer, C even): column ``k`` is channels 2k, 2k + 1."""
        flag = cuda.shared.array(1, np.int32)
        shared_n = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        shared_mean = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        shared_m2 = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        b = cuda.blockIdx.y
        num_rows = x.size // num_words
        end = (b + 1) * rows_per_block
        if end > num_rows:  # not min(): numba 0.68's CUDA target fails to type min(int, int)
            end = num_rows
        r, i, row_step = first_row(num_words, rows_per_block)
        last = index(end)
        pivot0 = acc(0)
        pivot1 = acc(0)
        a1 = acc(0)
        a2 = acc(0)
        b1 = acc(0)
        b2 = acc(0)
        values = 0
        if k < num_words:
            if r < last:
                word = x[i]
                pivot0 = acc(low(word))
                pivot1 = acc(high(word))
            while r < last:
                word = x[i]
                d0 = acc(low(word)) - pivot0
                d1 = acc(high(word)) - pivot1
                a1 += d0
                a2 += d0 * d0
                b1 += d1
                b2 += d1 * d1
                values += 1
                r = index(r + index(cuda.blockDim.y))
                i = index(i + row_step)
        c0 = 2 * k
        c1 = c0 + 1
        mean0, m20 = thread_partial(pivot0, a1, a2, values)
        mean1, m21 = thread_partial(pivot1, b1, b2, values)
        total0, mean0, m20 = column_merge(np.float64(values), mean0, m20, shared_n, shared_mean, shared_m2)
        cuda.syncthreads()  # column_merge reuses the shared slots
        total1, mean1, m21 = column_merge(np.float64(values), mean1, m21, shared_n, shared_mean, shared_m2)
        mine = cuda.threadIdx.y == 0 and k < num_words
        if cuda.gridDim.y > 1:
            if mine:
                part_n[c0, b] = total0
                part_mean[c0, b] = mean0
                part_m2[c0, b] = m20
                part_n[c1, b] = total1
                part_mean[c1, b] = mean1
                part_m2[c1, b] = m21
            if not finished_last(counters, cuda.blockIdx.x, cuda.gridDim.y, flag):
                return
            total0 = mean0 = m20 = total1 = mean1 = m21 = 0.0
            if k < num_words:
                total0, mean0, m20 = merge_channel_partials(c0, part_n, part_mean, part_m2, cuda.threadIdx.y,
                                                            cuda.blockDim.y)
                total1, mean1, m21 = merge_channel_partials(c1, part_n, part_mean, part_m2, cuda.threadIdx.y,
                                                            cuda.blockDim.y)
            cuda.syncthreads()
            total0, mean0, m20 = column_merge(total0, mean0, m20, shared_n, shared_mean, shared_m2)
            cuda.syncthreads()
            total1, mean1, m21 = column_merge(total1, mean1, m21, shared_n, shared_mean, shared_m2)
        if mine:
            finish_moments(c0, total0, mean0, m20, out_n, out_mean, out_m2, finalize, weight, bias, use_weight,
                           use_bias, eps, big, momentum, running_mean, running_var, update_running, save_mean,
                           save_invstd, center, scale, shift)
            finish_moments(c1, total1, mean1, m21, out_n, out_mean, out_m2, finalize, weight, bias, use_weight,
                           use_bias, eps, big, momentum, running_mean, running_var, update_running, save_mean,
                           save_invstd, center, scale, shift)

    @cuda.jit
    def rows_backward_sums_pairs(dy, x, mean, num_words, rows_per_block, part_sum_dy, part_sum_dy_xmu, counters,
                                 out_count, out_sum_dy, out_sum_dy_xmu, finalize, invstd, weight, use_weight,
                                 training, big, dweight, dbias, center, dy_scale, x_scale, shift):
        """:func:`rows_backward_sums` over ``uint32`` words of two channels each (as
        :func:`rows_moments_pairs`)."""
        flag = cuda.shared.array(1, np.int32)
        shared_a = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        shared_b = cuda.shared.array(MAX_THREADS_PER_BLOCK, np.float64)
        k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        b = cuda.blockIdx.y
        num_rows = x.size // num_words
        end = (b + 1) * rows_per_block
        if end > num_rows:  # not min(): numba 0.68's CUDA target fails to type min(int, int)
            end = num_rows
        r, i, row_step = first_row(num_words, rows_per_block)
        last = index(end)
        c0 = 2 * k
        c1 = c0 + 1
        a1 = acc(0)
        a2 = acc(0)
        b1 = acc(0)
        b2 = acc(0)
        if k < num_words:
            m0 = acc(mean[c0])
            m1 = acc(mean[c1])
            while r < last:
                g = dy[i]
                a = x[i]
                g0 = acc(low(g))
                g1 = acc(high(g))
                a1 += g0
                a2 += g0 * (acc(low(a)) - m0)
                b1 += g1
                b2 += g1 * (acc(high(a)) - m1)
                r = index(r + index(cuda.blockDim.y))
                i = index(i + row_step)
        sum0, xmu0 = column_sum2(np.float64(a1), np.float64(a2), shared_a, shared_b)
        cuda.syncthreads()  # column_sum2 reuses the shared slots
        sum1, xmu1 = column_sum2(np.float64(b1), np.float64(b2), shared_a, shared_b)
        mine = cuda.threadIdx.y == 0 and k < num_words
        if cuda.gridDim.y > 1:
            if mine:
                part_sum_dy[c0, b] = sum0
                part_sum_dy_xmu[c0, b] = xmu0
                part_sum_dy[c1, b] = sum1
                part_sum_dy_xmu[c1, b] = xmu1
            if not finished_last(counters, cuda.blockIdx.x, cuda.gridDim.y, flag):
                return
            sum0 = xmu0 = sum1 = xmu1 = 0.0
            if k < num_words:
                sum0, xmu0 = sum_channel_partials(c0, part_sum_dy, part_sum_dy_xmu, cuda.threadIdx.y, cuda.blockDim.y)
                sum1, xmu1 = sum_channel_partials(c1, part_sum_dy, part_sum_dy_xmu, cuda.threadIdx.y, cuda.blockDim.y)
            cuda.syncthreads()
            sum0, xmu0 = column_sum2(sum0, xmu0, shared_a, shared_b)
            cuda.syncthreads()
            sum1, xmu1 = column_sum2(sum1, xmu1, shared_a, shared_b)
        if mine:
            finish_sums(c0, num_rows, sum0, xmu0, out_count, out_sum_dy, out_sum_dy_xmu, finalize, mean, invstd,
                        weight, use_weight, training, big, dweight, dbias, center, dy_scale, x_scale, shift)
            finish_sums(c1, num_rows, sum1, xmu1, out_count, out_sum_dy, out_sum_dy_xmu, finalize, mean, invstd,
                        weight, use_weight, training, big, dweight, dbias, center, dy_scale, x_scale, shift)

    return FamilyKernels(rows_moments_pairs, rows_backward_sums_pairs)

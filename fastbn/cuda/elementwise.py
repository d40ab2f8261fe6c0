"""The elementwise kernels of both families: y from x, dx from dy and x, per channel.

Both families are one index space: element ``i`` of the flat buffer belongs to channel
``(i // S) % C``, with ``S`` the plane size for planes (``(N, C, S)``) and 1 for rows
(``(M, C)``).  No element pays a division: each thread keeps, for each of its four
cursors, the offset in the plane and the channel, and advances them by additions (the
step's plane and offset counts are computed once per thread).  Each thread has four
independent cursors ``T`` apart (``T`` the grid's thread count), so four loads are in
flight per thread and neighbouring threads still read neighbouring addresses.

:func:`elementwise_kernels` ``.apply_eval`` computes eval-mode coefficients from the
running statistics in its prologue, per block, into dynamic shared memory (block 0 also
stores the saved statistics): an eval forward is that one launch.  The coefficients are
those of :func:`fastbn.algebra.forward_channel`, as in the stage kernels.
"""

import collections
import functools

import numpy as np
from numba import cuda

from .. import dtypes
from ..algebra import forward_channel
from .plans import UNROLL

#: The elementwise kernels of one storage dtype.
ElementwiseKernels = collections.namedtuple("ElementwiseKernels",
                                            ["apply", "backward_apply", "apply_eval", "relu_mask"])


@cuda.jit(device=True)
def cursor(i, plane_size, num_channels):
    """(offset in its plane, channel) of flat index ``i``: the thread's one division."""
    plane = i // plane_size
    return i - plane * plane_size, plane % num_channels


@cuda.jit(device=True)
def advance(offset, c, step_offset, step_channels, plane_size, num_channels):
    """The cursor moved by a step of ``step_channels`` whole planes (mod C) and
    ``step_offset`` values: additions and at most one carry each."""
    offset += step_offset
    c += step_channels
    if offset >= plane_size:
        offset -= plane_size
        c += 1
    if c >= num_channels:
        c -= num_channels
    return offset, c


@cuda.jit(device=True)
def step_of(plane_size, num_channels):
    """(offset, channels) the cursors move per iteration: ``UNROLL`` grid widths."""
    step = UNROLL * cuda.gridsize(1)
    planes = step // plane_size
    return step - planes * plane_size, planes % num_channels


@functools.cache
def elementwise_kernels(dtype):
    """The :class:`ElementwiseKernels` for storage ``dtype``."""
    comp = dtypes.policy(dtype).compute.type

    @cuda.jit(device=True)
    def epilogue(v, residual, add_residual, floor, i):
        """The fused epilogue of value ``v`` of flat index ``i``: ``+ residual[i]`` when
        ``add_residual``, then the lower bound ``floor`` (-inf: none; 0: ReLU; NaN stays NaN)."""
        if add_residual:
            v += comp(residual[i])
        return floor if v < floor else v

    @cuda.jit(device=True)
    def apply_loop(x, residual, add_residual, floor, plane_size, num_channels, center, scale, shift, y):
        """y = epilogue((x - center[c]) * scale[c] + shift[c]) over this thread's elements."""
        size = x.size
        threads = cuda.gridsize(1)
        step_offset, step_channels = step_of(plane_size, num_channels)
        i0 = cuda.grid(1)
        i1 = i0 + threads
        i2 = i1 + threads
        i3 = i2 + threads
        o0, c0 = cursor(i0, plane_size, num_channels)
        o1, c1 = cursor(i1, plane_size, num_channels)
        o2, c2 = cursor(i2, plane_size, num_channels)
        o3, c3 = cursor(i3, plane_size, num_channels)
        step = UNROLL * threads
        while i3 < size:
            a0 = comp(x[i0])
            a1 = comp(x[i1])
            a2 = comp(x[i2])
            a3 = comp(x[i3])
            y[i0] = epilogue((a0 - center[c0]) * scale[c0] + shift[c0], residual, add_residual, floor, i0)
            y[i1] = epilogue((a1 - center[c1]) * scale[c1] + shift[c1], residual, add_residual, floor, i1)
            y[i2] = epilogue((a2 - center[c2]) * scale[c2] + shift[c2], residual, add_residual, floor, i2)
            y[i3] = epilogue((a3 - center[c3]) * scale[c3] + shift[c3], residual, add_residual, floor, i3)
            i0 += step
            i1 += step
            i2 += step
            i3 += step
            o0, c0 = advance(o0, c0, step_offset, step_channels, plane_size, num_channels)
            o1, c1 = advance(o1, c1, step_offset, step_channels, plane_size, num_channels)
            o2, c2 = advance(o2, c2, step_offset, step_channels, plane_size, num_channels)
            o3, c3 = advance(o3, c3, step_offset, step_channels, plane_size, num_channels)
        if i0 < size:
            y[i0] = epilogue((comp(x[i0]) - center[c0]) * scale[c0] + shift[c0], residual, add_residual,
                              floor, i0)
        if i1 < size:
            y[i1] = epilogue((comp(x[i1]) - center[c1]) * scale[c1] + shift[c1], residual, add_residual,
                              floor, i1)
        if i2 < size:
            y[i2] = epilogue((comp(x[i2]) - center[c2]) * scale[c2] + shift[c2], residual, add_residual,
                              floor, i2)

    @cuda.jit
    def apply(x, residual, add_residual, floor, plane_size, num_channels, center, scale, shift, y):
        """y = max((x - center[c]) * scale[c] + shift[c] (+ residual), floor); vectors (C,)
        and ``floor`` (-inf, or 0 for ReLU) in the compute dtype; ``residual`` like x, read
        only when ``add_residual`` (else any placeholder of x's type)."""
        apply_loop(x, residual, add_residual, floor, plane_size, num_channels, center, scale, shift, y)

    @cuda.jit
    def apply_eval(x, residual, add_residual, floor, plane_size, num_channels, running_mean, running_var, weight,
                   bias, use_weight, use_bias, eps, big, save_mean, save_invstd, y):
        """Eval forward in one launch: each block computes every channel's coefficients
        from the running statistics into dynamic shared memory (3 C values of the compute
        dtype), block 0 also storing save_mean and save_invstd, then applies them."""
        shared = cuda.shared.array(0, comp)
        center = shared[:num_channels]
        scale = shared[num_channels:2 * num_channels]
        shift = shared[2 * num_channels:3 * num_channels]
        c = cuda.threadIdx.x
        while c < num_channels:
            mean = np.float64(running_mean[c])
            var = np.float64(running_var[c])
            if cuda.blockIdx.x == 0:
                forward_channel(c, mean, var, weight, bias, use_weight, use_bias, eps, big,
                                save_mean, save_invstd, center, scale, shift)
            else:
                # Other blocks only need the coefficients: the saved statistics go to
                # slots forward_channel overwrites afterwards (center, then scale).
                forward_channel(c, mean, var, weight, bias, use_weight, use_bias, eps, big,
                                center, scale, center, scale, shift)
            c += cuda.blockDim.x
        cuda.syncthreads()
        apply_loop(x, residual, add_residual, floor, plane_size, num_channels, center, scale, shift, y)

    @cuda.jit
    def backward_apply(dy, x, plane_size, num_channels, center, dy_scale, x_scale, shift, dx):
        """dx = dy * dy_scale[c] + (x - center[c]) * x_scale[c] + shift[c] (compute dtype)."""
        size = x.size
        threads = cuda.gridsize(1)
        step_offset, step_channels = step_of(plane_size, num_channels)
        i0 = cuda.grid(1)
        i1 = i0 + threads
        i2 = i1 + threads
        i3 = i2 + threads
        o0, c0 = cursor(i0, plane_size, num_channels)
        o1, c1 = cursor(i1, plane_size, num_channels)
        o2, c2 = cursor(i2, plane_size, num_channels)
        o3, c3 = cursor(i3, plane_size, num_channels)
        step = UNROLL * threads
        while i3 < size:
            g0 = comp(dy[i0])
            g1 = comp(dy[i1])
            g2 = comp(dy[i2])
            g3 = comp(dy[i3])
            a0 = comp(x[i0])
            a1 = comp(x[i1])
            a2 = comp(x[i2])
            a3 = comp(x[i3])
            dx[i0] = g0 * dy_scale[c0] + (a0 - center[c0]) * x_scale[c0] + shift[c0]
            dx[i1] = g1 * dy_scale[c1] + (a1 - center[c1]) * x_scale[c1] + shift[c1]
            dx[i2] = g2 * dy_scale[c2] + (a2 - center[c2]) * x_scale[c2] + shift[c2]
            dx[i3] = g3 * dy_scale[c3] + (a3 - center[c3]) * x_scale[c3] + shift[c3]
            i0 += step
            i1 += step
            i2 += step
            i3 += step
            o0, c0 = advance(o0, c0, step_offset, step_channels, plane_size, num_channels)
            o1, c1 = advance(o1, c1, step_offset, step_channels, plane_size, num_channels)
            o2, c2 = advance(o2, c2, step_offset, step_channels, plane_size, num_channels)
            o3, c3 = advance(o3, c3, step_offset, step_channels, plane_size, num_channels)
        if i0 < size:
            dx[i0] = comp(dy[i0]) * dy_scale[c0] + (comp(x[i0]) - center[c0]) * x_scale[c0] + shift[c0]
        if i1 < size:
            dx[i1] = comp(dy[i1]) * dy_scale[c1] + (comp(x[i1]) - center[c1]) * x_scale[c1] + shift[c1]
        if i2 < size:
            dx[i2] = comp(dy[i2]) * dy_scale[c2] + (comp(x[i2]) - center[c2]) * x_scale[c2] + shift[c2]

    @cuda.jit
    def relu_mask(dy, y, g):
        """g = 0 where y <= 0 else dy (PyTorch's threshold_backward), flat buffers."""
        zero = comp(0)
        i = cuda.grid(1)
        while i < dy.size:
            g[i] = zero if comp(y[i]) <= zero else comp(dy[i])
            i += cuda.gridsize(1)

    return ElementwiseKernels(apply, backward_apply, apply_eval, relu_mask)


def eval_shared_bytes(num_channels, dtype):
    """Dynamic shared memory of ``apply_eval`` for C channels of storage ``dtype``."""
    return 3 * num_channels * dtypes.policy(dtype).compute.itemsize


#: Dynamic shared memory a kernel may use without opting in (48 KiB on every GPU).
MAX_DYNAMIC_SHARED = 48 * 1024

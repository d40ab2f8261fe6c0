"""Host driver of the CUDA backend: the GPU twin of :mod:`fastbn.cpu.driver`.

Arguments arrive already validated by :mod:`fastbn._api`; they are device arrays
(numba, or anything with ``__cuda_array_interface__``), viewed zero-copy as numba
arrays.  The host only plans launches: every value-dependent step (reductions,
merges, the per-channel algebra, the running-statistics update) runs in device
kernels, and nothing is copied back to the host.  Kernel launches are asynchronous on
the default stream; results are ready for anything queued after them there.

Memory order.  As on the CPU, an input whose bytes are channel-first (each (n, c)
plane contiguous) runs the NCHW kernels on its flat buffer, one whose bytes are
channel-last runs the NHWC kernels, whatever the logical ``layout`` (a PyTorch
``channels_last`` tensor seen as NCHW runs the NHWC kernels without a copy); anything
else is copied once into the layout's natural order.  Outputs are allocated in the
order the kernels ran in.

Launch geometry is read from :data:`fastbn.cuda.config.launch_config` at every call.
"""

import math

import numpy as np
from numba import cuda

from .. import _checks
from .arrays import (as_numba, data_pointer, dense_strides, flat, is_dense_in, like_caller, new_flat,
                     overlaps, strided_view)
from .config import WARP_SIZE, launch_config
from .dtypes import accumulator_dtype, compute_dtype
from .finalize import finalize_kernels
from .nchw import nchw_kernels
from .nhwc import nhwc_kernels
from .welford import merge_stat_partials, merge_sum_partials

PLANES, ROWS = "planes", "rows"
#: CUDA's limit on gridDim.y (gridDim.x allows 2**31 - 1).
MAX_GRID_Y = 65535


# --------------------------------------------------------------------------- layout

class _Geometry:
    """How an input of ``shape`` in ``layout`` is laid out for the kernels.

    order: PLANES or ROWS; axes: the logical axes in kernel memory order (outermost
    first); num_channels (C); plane_size (S, the product of the spatial dimensions);
    count: values per channel (N * S).
    """

    def __init__(self, x, layout):
        ndim = len(x.shape)
        channel = _checks.channel_axis(ndim, layout)
        spatial = tuple(a for a in range(1, ndim) if a != channel)
        planes_axes = (0, channel) + spatial
        rows_axes = (0,) + spatial + (channel,)
        self.shape = tuple(x.shape)
        self.num_channels = x.shape[channel]
        self.plane_size = math.prod(x.shape[a] for a in spatial)
        self.count = _checks.values_per_channel(self.shape, layout)
        if self.plane_size > 1 and is_dense_in(x, planes_axes):
            self.order = PLANES
        elif is_dense_in(x, rows_axes):
            self.order = ROWS
        else:  # neither: copied into the layout's natural order
            self.order = PLANES if layout == "NCHW" and self.plane_size > 1 else ROWS
        self.axes = planes_axes if self.order == PLANES else rows_axes

    def logical_view(self, buffer):
        """The flat kernel-order ``buffer`` seen with the input's shape."""
        return strided_view(buffer, self.shape, dense_strides(self.shape, buffer.dtype.itemsize, self.axes))

    def kernel_input(self, a):
        """``a`` (shaped like the input) as the flat kernel-order buffer; copied if not dense."""
        if is_dense_in(a, self.axes):
            return flat(a)
        buffer = new_flat(a.size, a.dtype)
        self.logical_view(buffer)[...] = a
        return buffer

    def output_target(self, out, inputs, dtype):
        """Flat buffer the elementwise kernel writes: ``out`` itself when it is dense in
        kernel order and is either exactly an input (elementwise kernels read and write
        the same index) or disjoint from all of them; else a fresh buffer."""
        if out is not None and is_dense_in(out, self.axes):
            target = flat(out)
            if all(data_pointer(target) == data_pointer(a) or not overlaps(target, a) for a in inputs):
                return target
        return new_flat(math.prod(self.shape), dtype)

    def finish_output(self, target, out, out_caller, caller):
        """The result for the caller: ``out`` (filled from ``target`` if needed) or ``target``."""
        if out is None:
            return like_caller(self.logical_view(target), caller)
        if data_pointer(target) != data_pointer(out):  # computed into a fresh buffer
            out[...] = self.logical_view(target)
        return out_caller


# --------------------------------------------------------------------------- launch plans

def _blocks(total, per_block):
    return -(-total // per_block)


def _elementwise_grid(size):
    config = launch_config
    return min(_blocks(size, config.threads_per_block), config.max_blocks), config.threads_per_block


def _channel_grid(num_channels):
    threads = launch_config.threads_per_block
    return _blocks(num_channels, threads), threads


def _merge_threads(num_partials):
    """Threads of a per-channel merge block: enough warps for the partials, no more."""
    return min(launch_config.threads_per_block, WARP_SIZE * _blocks(num_partials, WARP_SIZE))


class _ReductionPlan:
    """Grid, block and per-block share of a reduction over ``geometry``."""

    def __init__(self, geometry):
        config = launch_config
        num_channels = geometry.num_channels
        if geometry.order == PLANES:
            wanted = _blocks(geometry.count, config.values_per_block)
            per_channel = max(1, min(wanted, config.max_blocks // num_channels, MAX_GRID_Y))
            self.share = _blocks(geometry.count, per_channel)  # values j per block
            self.num_partials = _blocks(geometry.count, self.share)
            self.grid = (num_channels, self.num_partials)
            self.block = (config.threads_per_block,)
        else:
            lanes = min(WARP_SIZE, 1 << (num_channels - 1).bit_length())
            column_blocks = _blocks(num_channels, lanes)
            num_rows = geometry.count
            wanted = _blocks(num_rows, max(1, config.values_per_block // lanes))
            row_blocks = max(1, min(wanted, config.max_blocks // column_blocks, MAX_GRID_Y))
            self.share = _blocks(num_rows, row_blocks)  # rows per block
            self.num_partials = _blocks(num_rows, self.share)
            self.grid = (column_blocks, self.num_partials)
            self.block = (lanes, config.threads_per_block // lanes)


# --------------------------------------------------------------------------- passes

def _stats(xf, geometry, dtype, mean, var):
    """Per-channel mean and biased var of the flat input ``xf`` into ``mean``, ``var``."""
    plan = _ReductionPlan(geometry)
    partials = cuda.device_array((3, geometry.num_channels, plan.num_partials), dtype=np.float64)
    part_n, part_mean, part_m2 = partials[0], partials[1], partials[2]
    if geometry.order == PLANES:
        nchw_kernels(dtype).stats_partials[plan.grid, plan.block](
            xf, geometry.num_channels, geometry.plane_size, plan.share, part_n, part_mean, part_m2)
    else:
        nhwc_kernels(dtype).stats_partials[plan.grid, plan.block](
            xf, geometry.num_channels, plan.share, part_n, part_mean, part_m2)
    merge_stat_partials[geometry.num_channels, _merge_threads(plan.num_partials)](
        part_n, part_mean, part_m2, mean, var)


def _backward_sums(dyf, xf, mean, geometry, dtype, sum_dy, sum_dy_xmu):
    """Per-channel sum(dy) and sum(dy * (x - mean)) into ``sum_dy``, ``sum_dy_xmu``."""
    plan = _ReductionPlan(geometry)
    partials = cuda.device_array((2, geometry.num_channels, plan.num_partials), dtype=np.float64)
    if geometry.order == PLANES:
        nchw_kernels(dtype).backward_reduce[plan.grid, plan.block](
            dyf, xf, mean, geometry.num_channels, geometry.plane_size, plan.share,
            partials[0], partials[1])
    else:
        nhwc_kernels(dtype).backward_reduce[plan.grid, plan.block](
            dyf, xf, mean, geometry.num_channels, plan.share, partials[0], partials[1])
    merge_sum_partials[geometry.num_channels, _merge_threads(plan.num_partials)](
        partials[0], partials[1], sum_dy, sum_dy_xmu)


def _scale_shift(xf, yf, geometry, dtype, center, scale, shift):
    """yf = (xf - center[c]) * scale[c] + shift[c] over flat buffers."""
    grid, block = _elementwise_grid(xf.size)
    if geometry.order == PLANES:
        nchw_kernels(dtype).scale_shift[grid, block](
            xf, geometry.num_channels, geometry.plane_size, center, scale, shift, yf)
    else:
        nhwc_kernels(dtype).scale_shift[grid, block](xf, geometry.num_channels, center, scale, shift, yf)


def _backward_dx(dyf, xf, dxf, geometry, dtype, center, dy_scale, x_scale, shift):
    grid, block = _elementwise_grid(xf.size)
    if geometry.order == PLANES:
        nchw_kernels(dtype).backward_dx[grid, block](
            dyf, xf, geometry.num_channels, geometry.plane_size, center, dy_scale, x_scale, shift, dxf)
    else:
        nhwc_kernels(dtype).backward_dx[grid, block](
            dyf, xf, geometry.num_channels, center, dy_scale, x_scale, shift, dxf)


# --------------------------------------------------------------------------- backend API

def batch_stats(x, layout):
    """Per-channel (mean, biased var), each (C,) in the accumulator dtype (float64, or
    float32 for float16 input), as the caller's kind of device array."""
    caller = x
    x = as_numba(x)
    dtype = np.dtype(x.dtype)
    geometry = _Geometry(x, layout)
    stats = cuda.device_array((2, geometry.num_channels), dtype=accumulator_dtype(dtype))
    _stats(geometry.kernel_input(x), geometry, dtype, stats[0], stats[1])
    return like_caller(stats[0], caller), like_caller(stats[1], caller)


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       layout, out):
    """Forward pass; returns (y, save_mean, save_invstd).

    ``y`` like ``x`` (``out`` when given); the statistics (C,) in the accumulator dtype.
    weight, bias and the running statistics are in the compute dtype (float32 for
    float16 input); the running statistics are updated in place when training.
    """
    caller, out_caller = x, out
    x, weight, bias, running_mean, running_var, out = (
        as_numba(a) for a in (x, weight, bias, running_mean, running_var, out))
    dtype = np.dtype(x.dtype)
    geometry = _Geometry(x, layout)
    num_channels = geometry.num_channels
    xf = geometry.kernel_input(x)

    stats = cuda.device_array((3, num_channels), dtype=accumulator_dtype(dtype))
    save_mean, batch_var, save_invstd = stats[0], stats[1], stats[2]
    vectors = cuda.device_array((3, num_channels), dtype=compute_dtype(dtype))
    center, scale, shift = vectors[0], vectors[1], vectors[2]
    if training:
        _stats(xf, geometry, dtype, save_mean, batch_var)
        mean, var = save_mean, batch_var
    else:
        mean, var = running_mean, running_var
    update_running = training and running_mean is not None
    # Absent optional vectors are passed as placeholders of the right dtype (the kernel
    # does not touch them): a kernel argument cannot be None in every Numba version.
    forward_finalize, _ = finalize_kernels(dtype)
    forward_finalize[_channel_grid(num_channels)](
        mean, var,
        scale if weight is None else weight, shift if bias is None else bias,
        weight is not None, bias is not None, eps, training, update_running, momentum,
        float(geometry.count),
        center if running_mean is None else running_mean,
        center if running_var is None else running_var,
        save_mean, save_invstd, center, scale, shift)

    target = geometry.output_target(out, (xf,), dtype)
    _scale_shift(xf, target, geometry, dtype, center, scale, shift)
    y = geometry.finish_output(target, out, out_caller, caller)
    return y, like_caller(save_mean, caller), like_caller(save_invstd, caller)


def batch_norm_backward(dy, x, save_mean, save_invstd, weight, training, layout, out):
    """Backward pass; returns (dx, dweight, dbias).

    ``dx`` like ``x`` (``out`` when given); dweight, dbias (C,) in the compute dtype
    (x's dtype; float32 for float16 input).
    """
    caller, out_caller = x, out
    dy, x, save_mean, save_invstd, weight, out = (
        as_numba(a) for a in (dy, x, save_mean, save_invstd, weight, out))
    dtype = np.dtype(x.dtype)
    geometry = _Geometry(x, layout)
    num_channels = geometry.num_channels
    xf = geometry.kernel_input(x)
    dyf = geometry.kernel_input(dy)

    sums = cuda.device_array((2, num_channels), dtype=accumulator_dtype(dtype))
    sum_dy, sum_dy_xmu = sums[0], sums[1]
    _backward_sums(dyf, xf, save_mean, geometry, dtype, sum_dy, sum_dy_xmu)

    grads = cuda.device_array((2, num_channels), dtype=compute_dtype(dtype))
    dweight, dbias = grads[0], grads[1]
    vectors = cuda.device_array((4, num_channels), dtype=compute_dtype(dtype))
    center, dy_scale, x_scale, shift = vectors[0], vectors[1], vectors[2], vectors[3]
    _, backward_finalize = finalize_kernels(dtype)
    backward_finalize[_channel_grid(num_channels)](
        sum_dy, sum_dy_xmu, save_mean, save_invstd, dy_scale if weight is None else weight,
        weight is not None, training, float(geometry.count),
        dweight, dbias, center, dy_scale, x_scale, shift)

    target = geometry.output_target(out, (dyf, xf), dtype)
    if training:
        _backward_dx(dyf, xf, target, geometry, dtype, center, dy_scale, x_scale, shift)
    else:  # dx = dy * dy_scale: the scale-shift kernel with zero center and shift
        _scale_shift(dyf, target, geometry, dtype, center, dy_scale, shift)
    dx = geometry.finish_output(target, out, out_caller, caller)
    return dx, like_caller(dweight, caller), like_caller(dbias, caller)

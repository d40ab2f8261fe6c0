"""Host driver of the CPU backend: picks the kernel that matches the memory order, plans
the work split, and does the O(C) per-channel algebra in float64.

Arguments arrive already validated by :mod:`fastbn._api`.

Memory order.  Whatever the logical ``layout``, an array whose bytes are channel-first
(each (n, c) plane contiguous) runs the NCHW "planes" kernels on an (N, C, S) view, and
one whose bytes are channel-last runs the NHWC "rows" kernels on an (M, C) view; e.g. a
PyTorch ``channels_last`` tensor seen as NCHW runs the NHWC kernels without a copy.
Anything else (non-contiguous, negative strides) is copied once into the layout's
natural order.  Outputs are allocated in the order the kernels ran in.

Accuracy in float32.  ``y = (x - mean) * scale + bias`` must not be evaluated as
``x * a + b``: on offset data (x = 1e6 + 0.01 * randn) ``b`` is ~1e8 and float32 rounding
of the product alone swamps y.  The mean is split into ``center = float32(mean)`` and
``mean - center``; ``x - center`` is exact for x near the mean (Sterbenz) and the small
remainder is folded into the per-channel shift, so each element costs one subtraction
and one fused multiply-add in the input's dtype.
"""

import functools
import math

import numpy as np

from . import nchw, nhwc, welford
from ._jit import guarded

# Every launch goes through the thread/fork guard (see fastbn.cpu._jit).
nchw_stats_partials = guarded(nchw.nchw_stats_partials)
nchw_scale_shift = guarded(nchw.nchw_scale_shift)
nchw_backward_reduce = guarded(nchw.nchw_backward_reduce)
nchw_backward_dx = guarded(nchw.nchw_backward_dx)
nhwc_stats_partials = guarded(nhwc.nhwc_stats_partials)
nhwc_scale_shift = guarded(nhwc.nhwc_scale_shift)
nhwc_backward_reduce = guarded(nhwc.nhwc_backward_reduce)
nhwc_backward_dx = guarded(nhwc.nhwc_backward_dx)
merge_partials = guarded(welford.merge_partials)

PLANES, ROWS = "planes", "rows"

#: Values per NCHW work item: big enough to amortize the item's setup, small enough
#: that a few planes still split over all threads.
PLANE_BLOCK = 1 << 14
#: Planes smaller than this run the row kernels on an (N, C * S) view: a short plane
#: loop leaves most values to the scalar remainder of the vectorized loop.
MIN_PLANE = 128
#: Values per row tile (row chunk x column block) of the row kernels.
ROW_TILE = 1 << 16
#: Column-block width of the row reductions: bounds the per-tile accumulators and
#: shifts (3 x 2 KiB of float64) so they stay in L1 beside the streamed rows.  Blocks
#: hold whole channels.  Measured (statistics, float32, 2 threads): (4096, 1024)
#: 0.44 ms with 256 columns against 0.57 ms with 1024; NHWC (100352, 64) unchanged.
COLS_PER_BLOCK = 256
#: Channel-last rows are folded until a row holds at least this many values (vector lanes).
MIN_ROW_WIDTH = 64


# --------------------------------------------------------------------------- layout

def _channel_first(a, layout):
    return a if layout == "NCHW" else np.moveaxis(a, -1, 1)


def _channel_last(a, layout):
    return a if layout == "NHWC" else np.moveaxis(a, 1, -1)


def _has_planes(shape_channel_first):
    return len(shape_channel_first) > 2 and math.prod(shape_channel_first[2:]) > 1


def memory_order(x, layout):
    """The kernel family for ``x``: PLANES if its bytes are channel-first, else ROWS."""
    cf = _channel_first(x, layout)
    if _has_planes(cf.shape) and cf.flags.c_contiguous:
        return PLANES
    if _channel_last(x, layout).flags.c_contiguous:
        return ROWS
    # Neither: it will be copied, into the layout's natural order.
    return PLANES if layout == "NCHW" and _has_planes(cf.shape) else ROWS


def _is_contiguous_in(a, layout, order):
    view = _channel_first(a, layout) if order == PLANES else _channel_last(a, layout)
    return view.flags.c_contiguous


def kernel_view(a, layout, order):
    """``a`` as the C-contiguous (N, C, S) or (M, C) array the kernels take (copied if needed)."""
    if order == PLANES:
        cf = np.ascontiguousarray(_channel_first(a, layout))
        return cf.reshape(cf.shape[0], cf.shape[1], -1)
    cl = np.ascontiguousarray(_channel_last(a, layout))
    return cl.reshape(-1, cl.shape[-1])


def new_output(x, layout, order):
    """An uninitialized array shaped like ``x`` whose bytes are in ``order``."""
    if order == PLANES:
        buf = np.empty(_channel_first(x, layout).shape, dtype=x.dtype)
        return buf if layout == "NCHW" else np.moveaxis(buf, 1, -1)
    buf = np.empty(_channel_last(x, layout).shape, dtype=x.dtype)
    return buf if layout == "NHWC" else np.moveaxis(buf, -1, 1)


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides)


def _output_target(out, inputs, layout, order):
    """Where the kernel writes: ``out`` itself when it is in ``order`` and cannot be
    clobbered mid-kernel, else a fresh buffer (copied into ``out`` afterwards).

    Elementwise kernels read and write the same index, so ``out`` may *be* an input;
    a partial or shifted overlap would read already-written values, so it gets a buffer.
    """
    if out is None:
        return new_output(inputs[0], layout, order)
    if _is_contiguous_in(out, layout, order) and all(
            _same_view(out, a) or not np.may_share_memory(out, a) for a in inputs):
        return out
    return new_output(inputs[0], layout, order)


def _finish_output(target, out):
    if out is not None and target is not out:
        out[...] = target
        return out
    return target


# --------------------------------------------------------------------------- work plans
#
# Partitions depend on the shape only (never on the thread count), and partials are
# merged in a fixed order, so results are deterministic for a given thread count.

def _plane_partials_shape(x3):
    blocks_per_plane = -(-x3.shape[2] // PLANE_BLOCK)
    counts = np.full(blocks_per_plane, float(PLANE_BLOCK))
    counts[-1] = x3.shape[2] - PLANE_BLOCK * (blocks_per_plane - 1)
    return (x3.shape[0] * blocks_per_plane, x3.shape[1]), np.tile(counts, x3.shape[0])


def _uses_rows(xv, order):
    """True when the row reductions run: channel-last memory, or channel-first small planes.

    Small planes leave most of each plane to the scalar remainder of the vectorized loop;
    as (N, C * S) rows the reductions run long vector loops (measured on (64, 512, 7, 7)
    float32, 2 threads: statistics 0.17 ms as rows, 0.27 ms as planes).  The elementwise
    passes stay on planes whatever their size: as rows they would read per-column
    coefficient vectors of C * S values, rebuilt every call (0.22 ms against 0.18 ms)."""
    return order == ROWS or (xv.shape[2] < MIN_PLANE and xv.shape[1] * xv.shape[2] >= MIN_ROW_WIDTH)


def _row_fold(num_rows, num_cols):
    """How many rows to fold into one kernel row (1 when channels already fill the lanes)."""
    if num_cols >= MIN_ROW_WIDTH:
        return 1
    return max(1, min(num_rows, -(-MIN_ROW_WIDTH // num_cols)))


def _row_pieces(*arrays):
    """Kernel views as row-kernel pieces: a list of (views, expand), where ``views`` are
    2-D (rows, W) C-contiguous and ``expand(v)`` maps a (C,) per-channel vector to the
    (W,) per-column one.

    (M, C) channel-last views: folded main part (W = fold * C) and unfolded tail rows.
    (N, C, S) channel-first views: one piece (N, C * S).
    """
    if arrays[0].ndim == 3:
        num_n, _, size = arrays[0].shape
        return [(tuple(a.reshape(num_n, -1) for a in arrays), lambda v: np.repeat(v, size))]
    num_rows, num_cols = arrays[0].shape
    fold = _row_fold(num_rows, num_cols)
    main_rows = num_rows // fold * fold
    pieces = [(tuple(a[:main_rows].reshape(main_rows // fold, fold * num_cols) for a in arrays),
               lambda v: np.tile(v, fold))]
    if main_rows < num_rows:
        pieces.append((tuple(a[main_rows:] for a in arrays), lambda v: v))
    return pieces


def _row_tiles(width, chan):
    """(rows_per_chunk, cols_per_block) of a reduction over (rows, width) rows whose column
    ``j`` belongs to channel ``chan[j]``: blocks are whole channels (and whole rows when
    a channel's columns are not adjacent, i.e. folded rows)."""
    per_channel = width // (int(chan[-1]) + 1)
    if width <= COLS_PER_BLOCK or (per_channel > 1 and chan[1] != chan[0]):
        cols = width
    elif per_channel > 1:
        cols = max(1, COLS_PER_BLOCK // per_channel) * per_channel
    else:
        cols = COLS_PER_BLOCK
    return max(1, ROW_TILE // cols), cols


def _rows_per_chunk(width):
    """Rows per work item of the elementwise row kernels."""
    return max(1, ROW_TILE // width)


def _chunk_counts(num_rows, rows_per_chunk):
    num_chunks = -(-num_rows // rows_per_chunk)
    counts = np.full(num_chunks, float(rows_per_chunk))
    counts[-1] = num_rows - rows_per_chunk * (num_chunks - 1)
    return counts


def _channel_shift(xv):
    """One value of each channel's data (float64), the shift of its statistics sums."""
    first = xv[0, :, 0] if xv.ndim == 3 else xv[0]
    return first.astype(np.float64)


# --------------------------------------------------------------------------- passes

def _stats(xv, order):
    """Per-channel (mean, biased var), float64, of a kernel view."""
    num_channels = xv.shape[1]
    if not _uses_rows(xv, order):
        shape, counts = _plane_partials_shape(xv)
        part_mean, part_m2 = np.empty(shape), np.empty(shape)
        nchw_stats_partials(xv, PLANE_BLOCK, part_mean, part_m2)
    else:
        shift = _channel_shift(xv)
        all_counts, all_means, all_m2 = [], [], []
        for (piece,), expand in _row_pieces(xv):
            chan = expand(np.arange(num_channels))
            rows_per_chunk, cols_per_block = _row_tiles(piece.shape[1], chan)
            chunk_counts = _chunk_counts(piece.shape[0], rows_per_chunk)
            pm = np.empty((chunk_counts.size, num_channels))
            p2 = np.empty_like(pm)
            nhwc_stats_partials(piece, chan, shift, expand(shift), rows_per_chunk, cols_per_block, pm, p2)
            all_means.append(pm)
            all_m2.append(p2)
            all_counts.append(chunk_counts * (piece.shape[1] // num_channels))
        counts = np.concatenate(all_counts)
        part_mean = np.concatenate(all_means) if len(all_means) > 1 else all_means[0]
        part_m2 = np.concatenate(all_m2) if len(all_m2) > 1 else all_m2[0]
    mean, var = np.empty(num_channels), np.empty(num_channels)
    merge_partials(counts, part_mean, part_m2, mean, var)
    return mean, var


def _scale_shift(xv, yv, order, center, scale, shift):
    """yv = (xv - center) * scale + shift per channel; vectors already in xv's dtype."""
    if order == PLANES:
        nchw_scale_shift(xv, center, scale, shift, PLANE_BLOCK, yv)
        return
    for (xp, yp), expand in _row_pieces(xv, yv):
        nhwc_scale_shift(xp, expand(center), expand(scale), expand(shift),
                         _rows_per_chunk(xp.shape[1]), yp)


def _backward_sums(dyv, xv, order, mean):
    """Per-channel float64 sum(dy) and sum(dy * (x - mean))."""
    if not _uses_rows(xv, order):
        shape, _ = _plane_partials_shape(xv)
        part_dy, part_dy_xmu = np.empty(shape), np.empty(shape)
        nchw_backward_reduce(dyv, xv, mean, PLANE_BLOCK, part_dy, part_dy_xmu)
        return part_dy.sum(axis=0), part_dy_xmu.sum(axis=0)
    num_channels = xv.shape[1]
    sum_dy, sum_dy_xmu = np.zeros(num_channels), np.zeros(num_channels)
    for (gp, xp), expand in _row_pieces(dyv, xv):
        chan = expand(np.arange(num_channels))
        rows_per_chunk, cols_per_block = _row_tiles(xp.shape[1], chan)
        num_chunks = -(-xp.shape[0] // rows_per_chunk)
        part_dy = np.empty((num_chunks, num_channels))
        part_dy_xmu = np.empty_like(part_dy)
        nhwc_backward_reduce(gp, xp, chan, expand(mean), rows_per_chunk, cols_per_block,
                             part_dy, part_dy_xmu)
        sum_dy += part_dy.sum(axis=0)
        sum_dy_xmu += part_dy_xmu.sum(axis=0)
    return sum_dy, sum_dy_xmu


def _backward_dx(dyv, xv, dxv, order, center, dy_scale, x_scale, shift):
    if order == PLANES:
        nchw_backward_dx(dyv, xv, center, dy_scale, x_scale, shift, PLANE_BLOCK, dxv)
        return
    for (gp, xp, dp), expand in _row_pieces(dyv, xv, dxv):
        nhwc_backward_dx(gp, xp, expand(center), expand(dy_scale), expand(x_scale), expand(shift),
                         _rows_per_chunk(xp.shape[1]), dp)


def _coefficients(v, dtype):
    """Per-channel float64 coefficients in the kernels' dtype.

    Finite values beyond the dtype's range saturate at its largest finite value instead
    of overflowing to inf: with a tiny ``eps`` a constant float32 channel has
    ``invstd`` ~1e150, and ``(x - center) * inf`` would be ``0 * inf = NaN`` where the
    exact result is ``bias``.  NaN and Inf (from NaN/Inf data) pass through unchanged.
    """
    big = np.finfo(dtype).max
    return np.where(np.isfinite(v), np.clip(v, -big, big), v).astype(dtype)


def _quiet(fn):
    """Run ``fn`` with NumPy floating-point warnings off: NaN/Inf in the data propagate
    through the per-channel algebra as IEEE values, as they do through the kernels,
    without RuntimeWarnings (an error under ``-W error``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return wrapper


def _split_center(mean, dtype):
    """``mean`` (float64) as ``center`` in ``dtype`` plus the float64 remainder."""
    center = mean.astype(dtype)
    return center, mean - center


# --------------------------------------------------------------------------- backend API

@_quiet
def batch_stats(x, layout):
    """Per-channel (mean, biased var), float64 (C,)."""
    order = memory_order(x, layout)
    return _stats(kernel_view(x, layout, order), order)


@_quiet
def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       layout, out):
    """Forward pass; returns (y, save_mean, save_invstd) with float64 statistics."""
    order = memory_order(x, layout)
    xv = kernel_view(x, layout, order)
    if training:
        mean, var = _stats(xv, order)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.astype(np.float64)
    center, remainder = _split_center(mean, x.dtype)
    shift = -remainder * scale if bias is None else bias.astype(np.float64) - remainder * scale

    target = _output_target(out, (x,), layout, order)
    _scale_shift(xv, kernel_view(target, layout, order), order,
                 center, _coefficients(scale, x.dtype), _coefficients(shift, x.dtype))
    y = _finish_output(target, out)

    if training and running_mean is not None:
        n = xv.size // xv.shape[1]
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = ((1.0 - momentum) * running_var.astype(np.float64)
                            + momentum * (var * (n / (n - 1))))
    return y, mean, invstd


@_quiet
def batch_norm_backward(dy, x, save_mean, save_invstd, weight, training, layout, out):
    """Backward pass; returns (dx, dweight, dbias), the latter two in x's dtype."""
    order = memory_order(x, layout)
    xv = kernel_view(x, layout, order)
    dyv = kernel_view(dy, layout, order)
    mean = save_mean.astype(np.float64)
    invstd = save_invstd.astype(np.float64)
    w = np.ones_like(invstd) if weight is None else weight.astype(np.float64)

    sum_dy, sum_dy_xmu = _backward_sums(dyv, xv, order, mean)
    dweight = sum_dy_xmu * invstd
    dy_scale = w * invstd

    target = _output_target(out, (dy, x), layout, order)
    dxv = kernel_view(target, layout, order)
    if training:
        n = xv.size // xv.shape[1]
        # invstd * (invstd * mean(dy (x - mean))) first: 0 for a constant channel even
        # when invstd**2 overflows (tiny eps), where the product order gave inf * 0 = NaN.
        x_scale = -dy_scale * (invstd * (invstd * (sum_dy_xmu / n)))
        center, remainder = _split_center(mean, x.dtype)
        shift = -dy_scale * (sum_dy / n) - remainder * x_scale
        _backward_dx(dyv, xv, dxv, order, center, _coefficients(dy_scale, x.dtype),
                     _coefficients(x_scale, x.dtype), _coefficients(shift, x.dtype))
    else:
        zeros = np.zeros_like(dy_scale, dtype=x.dtype)
        _scale_shift(dyv, dxv, order, zeros, _coefficients(dy_scale, x.dtype), zeros)
    dx = _finish_output(target, out)
    return dx, dweight.astype(x.dtype), sum_dy.astype(x.dtype)

"""Work plans of the CPU kernels: how a reduction or an elementwise pass is split into
work items, and which kernel family reduces a channel-first view.

Partitions depend on the shape only (never on the thread count), and partials are
merged in a fixed order, so results are deterministic for a given input.
"""

import numpy as np

from ..geometry import ROWS

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


def plane_partials(x3):
    """(shape, counts) of the per-item partials of a plane reduction over x3 (N, C, S):
    shape (N * blocks_per_plane, C); counts (N * blocks_per_plane,) values per item."""
    blocks_per_plane = -(-x3.shape[2] // PLANE_BLOCK)
    counts = np.full(blocks_per_plane, float(PLANE_BLOCK))
    counts[-1] = x3.shape[2] - PLANE_BLOCK * (blocks_per_plane - 1)
    return (x3.shape[0] * blocks_per_plane, x3.shape[1]), np.tile(counts, x3.shape[0])


def reduces_as_rows(xv, family):
    """True when the row reductions run: channel-last memory, or channel-first small planes.

    Small planes leave most of each plane to the scalar remainder of the vectorized loop;
    as (N, C * S) rows the reductions run long vector loops (measured on (64, 512, 7, 7)
    float32, 2 threads: statistics 0.17 ms as rows, 0.27 ms as planes).  The elementwise
    passes stay on planes whatever their size: as rows they would read per-column
    coefficient vectors of C * S values, rebuilt every call (0.22 ms against 0.18 ms)."""
    return family == ROWS or (xv.shape[2] < MIN_PLANE and xv.shape[1] * xv.shape[2] >= MIN_ROW_WIDTH)


def row_fold(num_rows, num_cols):
    """How many rows to fold into one kernel row (1 when channels already fill the lanes)."""
    if num_cols >= MIN_ROW_WIDTH:
        return 1
    return max(1, min(num_rows, -(-MIN_ROW_WIDTH // num_cols)))


def row_pieces(*arrays):
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
    fold = row_fold(num_rows, num_cols)
    main_rows = num_rows // fold * fold
    pieces = [(tuple(a[:main_rows].reshape(main_rows // fold, fold * num_cols) for a in arrays),
               lambda v: np.tile(v, fold))]
    if main_rows < num_rows:
        pieces.append((tuple(a[main_rows:] for a in arrays), lambda v: v))
    return pieces


def row_tiles(width, chan):
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


def rows_per_chunk(width):
    """Rows per work item of the elementwise row kernels."""
    return max(1, ROW_TILE // width)


def chunk_counts(num_rows, rows_per_chunk):
    """Rows in each chunk of ``rows_per_chunk`` rows (the last one may be shorter), float64."""
    num_chunks = -(-num_rows // rows_per_chunk)
    counts = np.full(num_chunks, float(rows_per_chunk))
    counts[-1] = num_rows - rows_per_chunk * (num_chunks - 1)
    return counts


def channel_pivot(xv):
    """One value of each channel's data (float64), the pivot of its shifted sums."""
    first = xv[0, :, 0] if xv.ndim == 3 else xv[0]
    return first.astype(np.float64)

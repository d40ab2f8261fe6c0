"""Launch plans of the CUDA kernels: grids and blocks from a
:class:`~fastbn.geometry.Geometry` and :data:`fastbn.cuda.config.launch_config`
(read at every call, so tests can shrink it).

Plans depend on the shape and the configuration only, and partials are merged in a
fixed order, so results are deterministic for a given input and configuration.
"""

from ..geometry import PLANES
from .config import WARP_SIZE, launch_config

#: CUDA's limit on gridDim.y (gridDim.x allows 2**31 - 1).
MAX_GRID_Y = 65535


def blocks(total, per_block):
    """Blocks of ``per_block`` that cover ``total``."""
    return -(-total // per_block)


def elementwise_grid(size):
    """(grid, block) of a grid-stride elementwise kernel over ``size`` values."""
    config = launch_config
    return min(blocks(size, config.threads_per_block), config.max_blocks), config.threads_per_block


def channel_grid(num_channels):
    """(grid, block) of a per-channel kernel, one thread per channel."""
    threads = launch_config.threads_per_block
    return blocks(num_channels, threads), threads


class ReductionPlan:
    """Grid, block and per-block share of a reduction over ``geometry``.

    Planes: one 1-D block per (channel, chunk of ``share`` values).  Rows: 2-D blocks of
    ``lanes`` channels by row lanes, one per (channel block, range of ``share`` rows).
    ``num_partials`` blocks reduce each channel.
    """

    def __init__(self, geometry):
        config = launch_config
        num_channels = geometry.kept
        if geometry.family == PLANES:
            wanted = blocks(geometry.count, config.values_per_block)
            per_channel = max(1, min(wanted, config.max_blocks // num_channels, MAX_GRID_Y))
            self.share = blocks(geometry.count, per_channel)  # values j per block
            self.num_partials = blocks(geometry.count, self.share)
            self.grid = (num_channels, self.num_partials)
            self.block = (config.threads_per_block,)
        else:
            lanes = min(WARP_SIZE, 1 << (num_channels - 1).bit_length())
            column_blocks = blocks(num_channels, lanes)
            num_rows = geometry.outer
            wanted = blocks(num_rows, max(1, config.values_per_block // lanes))
            row_blocks = max(1, min(wanted, config.max_blocks // column_blocks, MAX_GRID_Y))
            self.share = blocks(num_rows, row_blocks)  # rows per block
            self.num_partials = blocks(num_rows, self.share)
            self.grid = (column_blocks, self.num_partials)
            self.block = (lanes, config.threads_per_block // lanes)

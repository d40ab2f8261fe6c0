"""Launch plans of the CUDA kernels: grids and blocks from a
:class:`~fastbn.geometry.Geometry` and :data:`fastbn.cuda.config.launch_config`
(read at every call, so tests can shrink it).

Plans depend on the shape and the configuration only, and partials are merged in a
fixed order, so results are deterministic for a given input and configuration.
"""

from numba import cuda

from ..geometry import PLANES
from .arrays import SIMULATOR
from .config import WARP_SIZE, launch_config

#: CUDA's limit on gridDim.y (gridDim.x allows 2**31 - 1).
MAX_GRID_Y = 65535


def blocks(total, per_block):
    """Blocks of ``per_block`` that cover ``total``."""
    return -(-total // per_block)


#: Values each elementwise thread handles per loop iteration (:mod:`fastbn.cuda.elementwise`).
UNROLL = 4
#: Resident threads per SM on every GPU since Volta (2048 on sm_80/sm_90).
THREADS_PER_SM = 2048
#: Fewest values a reduction block gets when blocks are added to fill the SMs.
MIN_VALUES_PER_BLOCK = 2048
_sm_counts = {}


def sm_count():
    """Streaming multiprocessors of the current device; None under the simulator."""
    if SIMULATOR:
        return None
    device = cuda.get_current_device()
    count = _sm_counts.get(device.id)
    if count is None:
        count = _sm_counts[device.id] = int(device.MULTIPROCESSOR_COUNT)
    return count


def elementwise_grid(size):
    """(grid, block) of a grid-stride elementwise kernel over ``size`` values: enough
    blocks for ``UNROLL`` values per thread, at most one full wave of resident threads
    (from the SM count) and ``max_blocks``."""
    config = launch_config
    threads = config.threads_per_block
    grid = min(blocks(size, threads * UNROLL), config.max_blocks)
    sms = sm_count()
    if sms is not None:
        grid = min(grid, sms * max(1, THREADS_PER_SM // threads))
    return max(grid, 1), threads


def _fill(wanted, outer_blocks, values, values_per_unit):
    """Blocks per channel (group) raised so the grid covers twice the SMs, keeping at
    least :data:`MIN_VALUES_PER_BLOCK` values per block."""
    sms = sm_count()
    if sms is None:
        return wanted
    most = max(1, values * values_per_unit // MIN_VALUES_PER_BLOCK)
    return max(wanted, min(blocks(2 * sms, outer_blocks), most))


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
            wanted = _fill(blocks(geometry.count, config.values_per_block), num_channels, geometry.count, 1)
            per_channel = max(1, min(wanted, config.max_blocks // num_channels, MAX_GRID_Y))
            self.share = blocks(geometry.count, per_channel)  # values j per block
            self.num_partials = blocks(geometry.count, self.share)
            self.grid = (num_channels, self.num_partials)
            self.block = (config.threads_per_block,)
        else:
            lanes = min(WARP_SIZE, 1 << (num_channels - 1).bit_length())
            column_blocks = blocks(num_channels, lanes)
            num_rows = geometry.outer
            wanted = _fill(blocks(num_rows, max(1, config.values_per_block // lanes)), column_blocks, num_rows, lanes)
            row_blocks = max(1, min(wanted, config.max_blocks // column_blocks, MAX_GRID_Y))
            self.share = blocks(num_rows, row_blocks)  # rows per block
            self.num_partials = blocks(num_rows, self.share)
            self.grid = (column_blocks, self.num_partials)
            self.block = (lanes, config.threads_per_block // lanes)

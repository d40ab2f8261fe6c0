"""Launch configuration of the CUDA kernels, read on the host at every call.

The defaults suit current data-centre GPUs; tests override them (tiny blocks, many
blocks per channel) to exercise every merge path on small tensors::

    from fastbn.cuda import launch_config
    with launch_config.override(threads_per_block=32, values_per_block=8):
        ...
"""

import contextlib
import dataclasses

WARP_SIZE = 32
#: Upper bound of ``threads_per_block``: the size of the kernels' static shared arrays.
MAX_THREADS_PER_BLOCK = 1024


@dataclasses.dataclass
class LaunchConfig:
    """How the reduction and elementwise kernels split their work.

    threads_per_block : threads in each block; a multiple of the warp size (the warp
        shuffles need full warps), at most :data:`MAX_THREADS_PER_BLOCK`.
    max_blocks : cap on the blocks of a reduction grid; a channel is split over at
        most ``max(1, max_blocks // C)`` blocks.  Elementwise grids use it too, with a
        grid-stride loop beyond it.
    values_per_block : values a reduction block aims to reduce; channels with more
        values than this are split over several blocks (per-block partials merged by
        a second kernel), so a few huge channels still fill the GPU.
    """

    threads_per_block: int = 256
    max_blocks: int = 8192
    values_per_block: int = 16384

    def validate(self):
        """Raise ValueError unless every field is usable."""
        tpb = self.threads_per_block
        if not (isinstance(tpb, int) and WARP_SIZE <= tpb <= MAX_THREADS_PER_BLOCK and tpb % WARP_SIZE == 0):
            raise ValueError(f"threads_per_block: expected a multiple of {WARP_SIZE} in "
                             f"[{WARP_SIZE}, {MAX_THREADS_PER_BLOCK}], got {tpb!r}")
        for name in ("max_blocks", "values_per_block"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")

    @contextlib.contextmanager
    def override(self, **changes):
        """Context manager: set some fields, restore them on exit."""
        unknown = set(changes) - {field.name for field in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"override: LaunchConfig has no field(s) {sorted(unknown)}")
        saved = {name: getattr(self, name) for name in changes}
        for name, value in changes.items():
            setattr(self, name, value)
        try:
            self.validate()
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


#: The configuration every call reads.
launch_config = LaunchConfig()

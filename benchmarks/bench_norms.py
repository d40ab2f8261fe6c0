"""asv benchmarks: layer, group and instance norm, fastbn and PyTorch in the same run.

Cases come from :mod:`fastbn.bench_norms` (the table behind ``python -m fastbn bench
--op layer|group|instance``).  ``FASTBN_ASV_SMOKE=1`` runs tiny shapes.  Commits older
than the norms have no ``fastbn.bench_norms``: the suite then has no cases.
"""

import numpy as np

from fastbn import bench as fbench

try:
    from fastbn import bench_norms
except ImportError:  # a commit before layer/group/instance norm
    bench_norms = None

SMOKE = fbench.smoke()


def _cases():
    if bench_norms is None:
        return []
    table = bench_norms.NORM_SMOKE_SHAPES if SMOKE else bench_norms.NORM_SHAPES
    return [f"{op}:{fbench.shape_label(shape)}:{layout}" for op in bench_norms.NORM_OPS
            for shape in table[op] for layout in bench_norms.layouts(op)]


class Norms:
    """Per-call wall time of one pass (forward or backward) of one implementation, float32."""

    params = (_cases(), ["forward", "backward"], ["fastbn", "torch"], [1] if SMOKE else [1, 2])
    param_names = ["case", "direction", "impl", "threads"]
    timeout = 300
    number = 0
    repeat = (1, 5, 5.0) if SMOKE else (3, 20, 20.0)

    def setup(self, case, direction, impl, threads):
        op, shape, layout = case.split(":")
        cls = bench_norms.NORM_IMPLEMENTATIONS[impl]
        if not cls.available():
            raise NotImplementedError(f"{impl} is not installed")
        fbench.set_threads(threads)
        self.fn = cls().prepare(op, direction, layout, fbench.parse_shape(shape), np.dtype(np.float32))
        self.fn()  # compile (or load from the disk cache) outside any timing

    def time_pass(self, case, direction, impl, threads):
        self.fn()

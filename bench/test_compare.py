"""fastbn vs the NumPy reference vs PyTorch CPU (when installed), one benchmark group per
(op, layout, shape, dtype), driven by :data:`fastbn.bench.IMPLEMENTATIONS`."""

import numpy as np
import pytest

from fastbn import bench as fbench

SHAPES = fbench.SMOKE_SHAPES[:1] if fbench.smoke() else ((32, 64, 56, 56), (64, 512, 7, 7), (4096, 1024))
OPS = ("forward_train", "forward_eval", "backward")
IMPLS = [pytest.param(cls, id=name) for name, cls in fbench.IMPLEMENTATIONS.items()]


@pytest.mark.parametrize("shape", SHAPES, ids=fbench.shape_label)
@pytest.mark.parametrize("layout", fbench.LAYOUTS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_op(benchmark, impl, op, layout, shape):
    if not impl.available():
        pytest.skip(f"{impl.name} is not installed")
    dtype = np.dtype(np.float32)
    fn = impl().prepare(op, layout, shape, dtype)
    fn()  # compile / warm up outside the timing
    benchmark.group = f"{op} {layout} {fbench.shape_label(shape)} {dtype.name}"
    nbytes = fbench.traffic_bytes(op, shape, dtype)
    benchmark.extra_info["bytes"] = nbytes
    if impl.name == "numpy":  # ~0.1 s a call: a few rounds are enough
        benchmark.pedantic(fn, rounds=3, iterations=1)
    else:
        benchmark(fn)
    benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.min / 1e9

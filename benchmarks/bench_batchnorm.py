"""asv benchmarks: fastbn's CPU ops over layouts, dtypes, shapes and thread counts.

Parameters come from :mod:`fastbn.bench` (one table for asv, pytest-benchmark and
``python -m fastbn bench``).  ``FASTBN_ASV_SMOKE=1`` swaps the shapes for one tiny 4-D one
(the 2-D path runs in ``SmallBatchNorm``) and the thread counts for 1, so CI can run the
whole suite in seconds (it checks that the suite runs, not the speed: asv starts a
process per parameter combination, which is what a smoke run costs).

Kernels are compiled (or loaded from Numba's disk cache) in ``setup``, never inside a
timing: ``setup`` builds the inputs and calls the op once.
"""

import numba
import numpy as np

from fastbn import bench as fbench

SMOKE = fbench.smoke()
SHAPES = [fbench.shape_label(s) for s in fbench.shapes()[:1 if SMOKE else None]]
DTYPES = ["float32"] if SMOKE else ["float32", "float64"]
THREADS = [1] if SMOKE else [t for t in fbench.THREADS if t <= numba.config.NUMBA_NUM_THREADS]
OPS = list(fbench.OPS)
LAYOUTS = list(fbench.LAYOUTS)
# asv runs the current benchmarks against every commit of a range: what is new in
# fastbn.bench gets a fallback, so older commits still import and run this suite.
_SMALL = getattr(fbench, "SMALL_SHAPES", ((32, 128), (256, 64), (8, 16, 8, 8), (16, 32, 16, 16)))
# smoke: one 2-D and one 4-D shape, so both layouts run
SMALL_SHAPES = [fbench.shape_label(s) for s in ((_SMALL[0], _SMALL[2]) if SMOKE else _SMALL)]
_per_call = getattr(fbench, "best_per_call", fbench.best_time)


def _prepare(op, layout, dtype, shape, threads):
    fbench.set_threads(threads)
    fn = fbench.Fastbn().prepare(op, layout, fbench.parse_shape(shape), np.dtype(dtype))
    fn()  # compile (or load from the disk cache) and fault pages in, outside any timing
    return fn


class BatchNorm:
    """Wall time of one fastbn op (outputs preallocated with ``out=``)."""

    params = (OPS, LAYOUTS, DTYPES, SHAPES, THREADS)
    param_names = ["op", "layout", "dtype", "shape", "threads"]
    timeout = 300
    number = 0  # let asv pick the number of calls per sample
    repeat = (1, 5, 5.0) if SMOKE else (3, 20, 20.0)
    warmup_time = 0.05

    def setup(self, op, layout, dtype, shape, threads):
        self.fn = _prepare(op, layout, dtype, shape, threads)

    def time_op(self, op, layout, dtype, shape, threads):
        self.fn()


class Throughput:
    """Effective GB/s (traffic model of :mod:`fastbn.bench`) and the fraction of the
    roofline it reaches: the same traffic as plain read/copy passes over the case's own
    arrays (same bytes, same cache state), timed right after it in the same process
    (``fastbn.bench.case_roofline``; older commits: ``fastbn.cpu.bandwidth`` over a fresh
    tensor's bytes)."""

    params = (OPS, LAYOUTS, DTYPES, SHAPES, THREADS)
    param_names = ["op", "layout", "dtype", "shape", "threads"]
    timeout = 300

    def setup(self, op, layout, dtype, shape, threads):
        self.shape = fbench.parse_shape(shape)
        repeat, min_time = (3, 0.0) if SMOKE else (20, 0.2)
        per_shape = hasattr(fbench, "case_roofline")
        if per_shape:
            fbench.sharing_inputs(True)  # the op and its bound read the same arrays
        try:
            self.fn = _prepare(op, layout, dtype, shape, threads)
            self.seconds = _per_call(self.fn, repeat, min_time)
            if per_shape:
                x, dy = fbench.shared_inputs(self.shape, layout, dtype)[:2]
                out = fbench.shared_output(self.shape, layout, dtype)
                self.roof_s = fbench.case_roofline(op, x, dy, out, repeat, min_time / 2)
            else:
                self.roof_s = fbench.roofline_seconds(op, fbench.roofline(self.shape, dtype, repeat, min_time / 2))
        finally:
            if per_shape:
                fbench.sharing_inputs(False)

    def track_gbps(self, op, layout, dtype, shape, threads):
        return fbench.traffic_bytes(op, self.shape, dtype) / self.seconds / 1e9

    track_gbps.unit = "GB/s"

    def track_roofline_fraction(self, op, layout, dtype, shape, threads):
        return self.roof_s / self.seconds

    track_roofline_fraction.unit = "fraction of roofline"


class Bandwidth:
    """The roofline itself: fastbn's read and copy passes over one tensor's bytes (GB/s)."""

    params = (DTYPES, SHAPES, THREADS)
    param_names = ["dtype", "shape", "threads"]
    timeout = 300

    def setup(self, dtype, shape, threads):
        fbench.set_threads(threads)
        repeat, min_time = (3, 0.0) if SMOKE else (20, 0.2)
        self.roof = fbench.roofline(fbench.parse_shape(shape), dtype, repeat, min_time)

    def track_read_gbps(self, dtype, shape, threads):
        return self.roof["read_gbps"]

    track_read_gbps.unit = "GB/s"

    def track_copy_gbps(self, dtype, shape, threads):
        return self.roof["copy_gbps"]

    track_copy_gbps.unit = "GB/s"


class Memory:
    """Peak resident memory of a call that allocates its output (no ``out=``)."""

    params = (["forward_train", "backward"], LAYOUTS, DTYPES[:1], SHAPES)
    param_names = ["op", "layout", "dtype", "shape"]
    timeout = 300

    def setup(self, op, layout, dtype, shape):
        self.x, self.dy, self.w, self.b, _, _ = fbench.make_inputs(fbench.parse_shape(shape), layout, dtype)
        import fastbn
        _, self.mean, self.invstd = fastbn.batch_norm_forward(self.x, self.w, self.b, layout=layout)

    def peakmem_op(self, op, layout, dtype, shape):
        import fastbn
        if op == "forward_train":
            fastbn.batch_norm_forward(self.x, self.w, self.b, layout=layout)
        else:
            fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w, layout=layout)


SMALL_OPS = ["forward_train", "forward_eval", "backward"]


def _skip_layoutless(layout, shape):
    """A 2-D (N, C) batch has one memory order: its NHWC case would repeat the NCHW one."""
    if layout == "NHWC" and len(fbench.parse_shape(shape)) == 2:
        raise NotImplementedError("(N, C) has no channel-last order")


class SmallBatchNorm:
    """Per-call time of fastbn on small layers (an MLP's features, a small CNN's
    activations), float32, the default thread count: a call's fixed cost (checks,
    temporaries, launches) rather than bandwidth.  asv picks the calls per sample, so
    each sample is a loop of calls and the result is the time of one call in it."""

    params = (SMALL_OPS, LAYOUTS, SMALL_SHAPES)
    param_names = ["op", "layout", "shape"]
    timeout = 120
    number = 0
    repeat = (1, 5, 5.0) if SMOKE else (3, 20, 20.0)
    warmup_time = 0.05

    def setup(self, op, layout, shape):
        _skip_layoutless(layout, shape)
        fbench.set_threads(numba.config.NUMBA_NUM_THREADS)
        self.fn = fbench.Fastbn().prepare(op, layout, fbench.parse_shape(shape), np.dtype(np.float32))
        self.fn()

    def time_fastbn(self, op, layout, shape):
        self.fn()


class SmallVsTorch:
    """On the same small layers: PyTorch CPU's per-call time over fastbn's (``F.batch_norm``
    without autograd; backward: ``aten.native_batch_norm_backward``), both measured in
    setup, in this process; >= 1 means fastbn is at least as fast.  Skipped without torch."""

    params = (SMALL_OPS, LAYOUTS, SMALL_SHAPES)
    param_names = ["op", "layout", "shape"]
    timeout = 120

    def setup(self, op, layout, shape):
        _skip_layoutless(layout, shape)
        if not fbench.Torch.available():
            raise NotImplementedError("PyTorch is not installed")
        import time
        fbench.set_threads(numba.config.NUMBA_NUM_THREADS)
        shape = fbench.parse_shape(shape)
        repeat, min_time = (3, 0.0) if SMOKE else (20, 0.2)
        fns = {cls.name: cls().prepare(op, layout, shape, np.dtype(np.float32))
               for cls in (fbench.Fastbn, fbench.Torch)}
        best = {}
        for _ in range(1 if SMOKE else 3):  # alternate, pausing so the other pool's workers stop spinning
            for name, fn in fns.items():
                time.sleep(0.05)
                best[name] = min(best.get(name, float("inf")), _per_call(fn, repeat, min_time))
        self.ratio = best["torch"] / best["fastbn"]

    def track_torch_over_fastbn(self, op, layout, shape):
        return self.ratio

    track_torch_over_fastbn.unit = "ratio"

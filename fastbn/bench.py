"""Benchmark plumbing shared by ``python -m fastbn bench``, the asv suite (``benchmarks/``)
and the pytest-benchmark suite (``bench/``).

One table drives all three: :data:`IMPLEMENTATIONS` maps a name to a class that, given an
op, a layout, a shape and a dtype, builds its inputs once and returns a zero-argument
callable running that op (numbagg style).  Outputs are preallocated where the
implementation allows it (``out=``), so timings measure the kernels, not page faults.

Ops and their traffic model (tensor-sized passes over memory, the numerator of the
effective bandwidth):

========================  ======  ===============================================
op                        passes  data movement
========================  ======  ===============================================
``stats``                 1       read x
``forward_train``         3       read x (statistics); read x, write y
``forward_eval``          2       read x, write y
``backward``              5       read dy, x (sums); read dy, x, write dx
========================  ======  ===============================================

Shapes are given in NCHW order; ``layout="NHWC"`` means channel-last memory (for
PyTorch: ``channels_last``, the same logical NCHW tensor).
"""

import math
import os

import numpy as np

import fastbn
from fastbn import reference
from fastbn.dtypes import numpy_dtype, policy
from fastbn._timing import best_per_call, best_time  # noqa: F401  (re-exported for the suites)
# The asv suite runs this checkout's benchmarks against older commits too, which define these
# here: it reaches them as fastbn.bench.* (defined in fastbn.bench_roofline).
from fastbn.bench_roofline import (cache_label, case_roofline, footprint_bytes,  # noqa: F401
                                   last_level_cache_bytes, roofline, roofline_seconds)

OPS = ("stats", "forward_train", "forward_eval", "backward")
LAYOUTS = ("NCHW", "NHWC")
TRAFFIC = {"stats": 1, "forward_train": 3, "forward_eval": 2, "backward": 5}

#: The shapes of the suite (NCHW order): ResNet-style activations, a 2-D batch of
#: features, and one tensor larger than a typical last-level cache (103 MB float32).
SHAPES = ((32, 64, 56, 56), (32, 256, 14, 14), (64, 512, 7, 7), (8, 32, 112, 112),
          (4096, 1024), (32, 64, 112, 112))
#: Small layers (an MLP's features, a small CNN's activations), where a call's fixed cost
#: (argument checks, temporaries, launches) rather than bandwidth decides its time; timed
#: per call (us).
SMALL_SHAPES = ((32, 128), (256, 64), (8, 16, 8, 8), (16, 32, 16, 16))
#: Named shape sets for ``python -m fastbn bench --shapes NAME``.
SHAPE_SETS = {"suite": SHAPES, "small": SMALL_SHAPES}
#: Tiny stand-ins for smoke runs (CI): same ranks, milliseconds of work.
SMOKE_SHAPES = ((4, 8, 6, 6), (64, 12))
THREADS = (1, 2)


def smoke():
    """True when ``FASTBN_ASV_SMOKE`` (or ``FASTBN_BENCH_SMOKE``) asks for tiny shapes."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("FASTBN_ASV_SMOKE", "FASTBN_BENCH_SMOKE"))


def shapes():
    return SMOKE_SHAPES if smoke() else SHAPES


def shape_label(shape):
    return "x".join(map(str, shape))


def parse_shapes(items):
    """Shapes from command-line items: ``N,C[,H,W]`` (or ``NxCxHxW``) or a set's name
    (:data:`SHAPE_SETS`: ``suite``, ``small``)."""
    shapes = []
    for item in items:
        if item in SHAPE_SETS:
            shapes.extend(SHAPE_SETS[item])
        else:
            shapes.append(parse_shape(item))
    return shapes


def parse_shape(text):
    return tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())


def traffic_bytes(op, shape, dtype):
    return TRAFFIC[op] * math.prod(shape) * np.dtype(dtype).itemsize


def to_layout(a, layout):
    """A C-contiguous array in ``layout`` from logical NCHW data (channel-last copy for NHWC)."""
    if layout == "NHWC" and a.ndim > 2:
        return np.ascontiguousarray(np.moveaxis(a, 1, -1))
    return np.ascontiguousarray(a)


_INPUT_CACHE = {}


def shared_inputs(shape, layout, dtype):
    """:func:`make_inputs`, memoized while :func:`sharing_inputs` is on: every implementation
    of a report then reads the same arrays (and memory holds one copy per layout)."""
    key = (tuple(shape), layout, np.dtype(dtype).str)
    if _INPUT_CACHE.get("on"):
        if key not in _INPUT_CACHE:
            _INPUT_CACHE[key] = make_inputs(shape, layout, dtype)
        return _INPUT_CACHE[key]
    return make_inputs(shape, layout, dtype)


def shared_output(shape, layout, dtype):
    """A preallocated output for fastbn's ``out=`` (pages mapped), shared like
    :func:`shared_inputs`, so a case's roofline probe writes the very buffer it wrote."""
    key = ("out", tuple(shape), layout, np.dtype(dtype).str)
    if _INPUT_CACHE.get("on") and key in _INPUT_CACHE:
        return _INPUT_CACHE[key]
    x = shared_inputs(shape, layout, dtype)[0]
    out = np.empty_like(x)
    out.fill(0)  # map the pages now, not in the first timed call
    if _INPUT_CACHE.get("on"):
        _INPUT_CACHE[key] = out
    return out


def sharing_inputs(on):
    """Turn input sharing on (True) or off and forget the cached inputs."""
    _INPUT_CACHE.clear()
    _INPUT_CACHE["on"] = bool(on)


def make_inputs(shape, layout, dtype, seed=0):
    """(x, dy, weight, bias, running_mean, running_var) in ``layout``; ``shape`` in NCHW order.

    x and dy are of ``dtype``, the per-channel vectors of its parameter dtype (float32
    for float16/bfloat16, :mod:`fastbn.dtypes`)."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    x = to_layout((3.0 + 2.0 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype), layout)
    dy = to_layout(rng.standard_normal(shape, dtype=np.float32).astype(dtype), layout)
    parameters = policy(dtype).parameters
    weight = rng.uniform(0.5, 1.5, channels).astype(parameters)
    bias = rng.standard_normal(channels).astype(parameters)
    return x, dy, weight, bias, np.zeros(channels, parameters), np.ones(channels, parameters)


def parse_dtype(name):
    """The NumPy dtype named ``name`` (``"bfloat16"`` needs ``ml_dtypes``)."""
    dtype = numpy_dtype(name)
    if dtype is None:
        raise SystemExit(f"--dtype {name}: needs ml_dtypes (pip install ml_dtypes)")
    return dtype


class Implementation:
    """Builds a callable for (op, layout, shape, dtype); subclasses set ``name``."""

    name = ""
    label = ""

    @classmethod
    def available(cls):
        return True

    def supports(self, op, layout, shape, dtype):
        return True

    def prepare(self, op, layout, shape, dtype):
        raise NotImplementedError


class Fastbn(Implementation):
    name, label = "fastbn", "fastbn (Numba CPU)"

    def prepare(self, op, layout, shape, dtype):
        x, dy, w, b, rm, rv = shared_inputs(shape, layout, dtype)
        out = shared_output(shape, layout, dtype)
        if op == "stats":
            return lambda: fastbn.batch_stats(x, layout=layout)
        if op == "forward_train":
            return lambda: fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                                    training=True, layout=layout, out=out)
        if op == "forward_eval":
            return lambda: fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                                    training=False, layout=layout, out=out)
        _, mean, invstd = fastbn.batch_norm_forward(x, w, b, layout=layout)
        return lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, out=out)


class Reference(Implementation):
    name, label = "numpy", "NumPy reference (float64)"

    def supports(self, op, layout, shape, dtype):
        return np.dtype(dtype).itemsize > 2  # 16-bit storage would time its float64 upcast

    def prepare(self, op, layout, shape, dtype):
        x, dy, w, b, rm, rv = shared_inputs(shape, layout, dtype)
        if op == "stats":
            return lambda: reference.batch_stats(x, layout=layout)
        if op == "forward_train":
            return lambda: reference.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                                       training=True, layout=layout)
        if op == "forward_eval":
            return lambda: reference.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                                       training=False, layout=layout)
        _, mean, invstd = reference.batch_norm_forward(x, w, b, layout=layout)
        return lambda: reference.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)


class Torch(Implementation):
    """PyTorch CPU: ``F.batch_norm`` (NHWC as ``channels_last``), ``aten.native_batch_norm_backward``."""

    name, label = "torch", "PyTorch CPU"

    @classmethod
    def available(cls):
        try:
            import torch  # noqa: F401
        except ImportError:
            return False
        return True

    def prepare(self, op, layout, shape, dtype):
        import torch
        import torch.nn.functional as F

        x, dy, w, b, rm, rv = shared_inputs(shape, layout, dtype)

        def logical(a):  # the NCHW-ordered tensor over a's memory (channels_last for NHWC)
            if a.dtype.name == "bfloat16":  # ml_dtypes: torch takes the bits
                t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(a)
            if layout == "NHWC" and a.ndim > 2:
                t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
            return t

        tx, tdy = logical(x), logical(dy)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        dims = [d for d in range(tx.ndim) if d != 1]
        if op == "stats":
            return lambda: torch.var_mean(tx, dim=dims, correction=0)
        if op in ("forward_train", "forward_eval"):
            training = op == "forward_train"

            def run():
                with torch.no_grad():
                    return F.batch_norm(tx, trm, trv, tw, tb, training, 0.1, 1e-5)
            return run
        with torch.no_grad():
            _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
        return lambda: torch.ops.aten.native_batch_norm_backward(
            tdy, tx, tw, trm, trv, save_mean, save_invstd, True, 1e-5, [True, True, True])


#: Implementations to compare, in report order; the first is the one under test.
IMPLEMENTATIONS = {cls.name: cls for cls in (Fastbn, Reference, Torch)}


def available_implementations():
    return {name: cls for name, cls in IMPLEMENTATIONS.items() if cls.available()}


def set_threads(threads):
    """Use ``threads`` threads in Numba (and PyTorch when it is loaded)."""
    import sys

    import numba
    numba.set_num_threads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)

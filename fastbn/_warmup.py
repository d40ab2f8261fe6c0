"""``python -m fastbn warmup``: fill Numba's on-disk cache ahead of the first real call."""

import sys
import time

import numba
import numpy as np

import fastbn
from fastbn import bench as fbench
from fastbn.cpu import small

WARMUP_DOC = """Compile every public CPU pass of fastbn (batch statistics, moments, training and
eval forward with and without running statistics and affine parameters, backward; layer,
group and instance norm forward and backward) for the named dtypes and layouts, on tensors of rank 2 to 5, so that later processes load the
kernels from Numba's disk cache instead of compiling them.  A second round compiles the
parallel kernels that tensors above fastbn.cpu.small.SMALL_SIZE values run.
Prints where the cache lives and how long each part took."""


def cache_locations():
    """The directories Numba's disk cache uses for fastbn's loaded kernels (from the
    dispatchers' cache locators: NUMBA_CACHE_DIR, else __pycache__ beside the sources,
    else Numba's user-wide cache directory)."""
    from numba.core.dispatcher import Dispatcher
    found = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastbn"):
            continue
        for obj in list(vars(module).values()):
            for d in (obj, getattr(obj, "parallel", None), getattr(obj, "_serial", None)):
                cache = getattr(d, "_cache", None) if isinstance(d, Dispatcher) else None
                path = getattr(cache, "_cache_path", None)
                if path:
                    found.add(path)
    return sorted(found)


def warmup_calls(dtype, layout):
    """Run each public pass once on tiny inputs of ``dtype`` in ``layout`` (ranks 2-5)."""
    from fastbn import stages
    shapes = [(6, 4), (3, 4, 5), (2, 4, 3, 5), (2, 4, 2, 3, 3)]
    for shape in shapes:
        if layout == "NHWC" and len(shape) == 2:
            continue  # (N, C) has one memory order; the NCHW round covers it
        x, dy, w, b, rm, rv = fbench.make_inputs(shape, layout, dtype)
        fastbn.batch_stats(x, layout=layout)
        stages.moments(x, layout=layout)
        for weight, bias in ((w, b), (None, None)):
            y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, layout=layout)
            fastbn.batch_norm_forward(x, weight, bias, running_mean=rm.copy(), running_var=rv.copy(),
                                      layout=layout, out=np.empty_like(x))
            fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv, training=False,
                                      layout=layout)
            fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout)
            fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout, out=np.empty_like(x))
        norm_warmup_calls(x, dy, w, b, rm, rv, layout)


def norm_warmup_calls(x, dy, weight, bias, running_mean, running_var, layout):
    """Layer, group and instance norm forward and backward once on ``x`` (C even) in
    ``layout``: every kernel signature :mod:`fastbn.cpu.norms` launches (absent affine
    parameters are placeholders of the same types, so one call with them covers both)."""
    y, mean, invstd = fastbn.group_norm_forward(x, 2, weight, bias, layout=layout)
    fastbn.group_norm_backward(dy, x, 2, mean, invstd, weight, layout=layout)
    if x.ndim > 2:
        fastbn.instance_norm(x, running_mean.copy(), running_var.copy(), weight, bias, layout=layout)
    if layout == "NCHW":  # layer norm has no layout: one round
        shape = x.shape[-1:]
        y, mean, invstd = fastbn.layer_norm_forward(x, shape, np.ones(shape, x.dtype), np.zeros(shape, x.dtype))
        fastbn.layer_norm_backward(dy, x, shape, mean, invstd, np.ones(shape, x.dtype))


def warmup_main(args):
    """``python -m fastbn warmup``: :func:`warmup_calls` for ``args.dtypes`` x ``args.layouts``,
    through the serial small-tensor kernels, then again with the parallel ones forced."""
    rounds = [("", None), (" (parallel kernels: SMALL_SIZE = 0)", 0)]
    print(f"fastbn {fastbn.__version__}, numba {numba.__version__}: warming the disk cache for "
          f"{' '.join(args.dtypes)} x {' '.join(args.layouts)}")
    start = time.perf_counter()
    for label, size in rounds:
        saved = None
        if size is not None:
            saved, small.SMALL_SIZE = small.SMALL_SIZE, size
        try:
            for dtype in args.dtypes:
                for layout in args.layouts:
                    t0 = time.perf_counter()
                    warmup_calls(np.dtype(dtype), layout)
                    print(f"  {dtype} {layout}{label}: {time.perf_counter() - t0:.1f} s")
        finally:
            if saved is not None:
                small.SMALL_SIZE = saved
    print(f"done in {time.perf_counter() - start:.1f} s (compiling, or loading what was already cached)")
    env_dir = numba.config.CACHE_DIR
    print(f"NUMBA_CACHE_DIR: {env_dir or '(unset)'}")
    locations = cache_locations()
    print("cache: " + (", ".join(locations) if locations else "none (caching unavailable: kernels compile "
                                                                  "in memory in every process)"))
    return 0

"""``python -m fastbn``: check fastbn against the NumPy reference, then time it.

Prints one table: for each layout and pass, fastbn's time (ms), its effective bandwidth
(traffic model: training forward reads x twice and writes y = 3 tensor passes; backward
reads x and dy twice and writes dx = 5 passes), the reference's time and the speed-up.
"""

import argparse
import sys
import time

import numpy as np

import fastbn
from fastbn import reference

DEFAULT_SHAPE = (32, 64, 56, 56)
LAYOUTS = ("NCHW", "NHWC")


def best_time(fn, repeat, min_time=0.2):
    """Best wall time (s) of ``fn()`` over ``repeat`` runs, and at least ``min_time`` seconds."""
    fn()  # warm-up: compiles (or loads from cache) and faults pages in
    best = float("inf")
    start = time.perf_counter()
    runs = 0
    while runs < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def make_inputs(shape, layout, dtype, seed=0):
    """Random (x, dy, weight, bias) in ``layout``; ``shape`` is given in NCHW order."""
    rng = np.random.default_rng(seed)
    if layout == "NHWC":
        shape = (shape[0], *shape[2:], shape[1])
    channels = shape[1] if layout == "NCHW" else shape[-1]
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    return x, dy, weight, bias


def check(shape, dtype):
    """Max relative error of fastbn's y and dx against the float64 reference, per layout."""
    errors = {}
    for layout in LAYOUTS:
        x, dy, weight, bias = make_inputs(shape, layout, dtype)
        y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, layout=layout)
        dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(x64, weight, bias, layout=layout)
        dx_ref, _, _ = reference.batch_norm_backward(dy64, x64, mean_ref, invstd_ref, weight, layout=layout)
        errors[layout] = max(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)),
                             np.max(np.abs(dx - dx_ref)) / np.max(np.abs(dx_ref)))
    return errors


def timing_rows(shape, dtype, repeat):
    """Yield (layout, pass, fastbn s, reference s, bytes moved) for the default report."""
    for layout in LAYOUTS:
        x, dy, weight, bias = make_inputs(shape, layout, dtype)
        rm = np.zeros_like(weight)
        rv = np.ones_like(weight)
        y_buf, dx_buf = np.empty_like(x), np.empty_like(x)
        _, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, layout=layout)
        passes = {
            "forward (train)": (3, lambda: fastbn.batch_norm_forward(
                x, weight, bias, rm, rv, layout=layout, out=y_buf),
                lambda: reference.batch_norm_forward(x, weight, bias, rm, rv, layout=layout)),
            "backward": (5, lambda: fastbn.batch_norm_backward(
                dy, x, mean, invstd, weight, layout=layout, out=dx_buf),
                lambda: reference.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout)),
        }
        for name, (tensor_passes, run_fastbn, run_reference) in passes.items():
            yield (layout, name, best_time(run_fastbn, repeat), best_time(run_reference, max(1, repeat // 5)),
                   tensor_passes * x.nbytes)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)),
                        help="N,C,H,W (NCHW order; NHWC uses the same sizes); default %(default)s")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per measurement")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = np.dtype(args.dtype)

    import numba
    print(f"fastbn {fastbn.__version__}, numba {numba.__version__}, numpy {np.__version__}, "
          f"{numba.get_num_threads()} threads")
    t0 = time.perf_counter()
    errors = check((4, 8, 9, 7), dtype)
    print(f"check against the float64 reference (first call, JIT or disk cache: "
          f"{time.perf_counter() - t0:.1f} s): "
          + ", ".join(f"{layout} max rel. error {err:.1e}" for layout, err in errors.items()))
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    ok = all(err < tolerance for err in errors.values())
    print("OK" if ok else f"FAILED: error above {tolerance:g}")

    print(f"\nshape {shape} {dtype}, best of {args.repeat} (reference: float64 NumPy, "
          f"best of {max(1, args.repeat // 5)})")
    header = f"{'layout':6}  {'pass':16} {'fastbn ms':>10} {'GB/s':>7} {'reference ms':>13} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for layout, name, t_fast, t_ref, nbytes in timing_rows(shape, dtype, args.repeat):
        print(f"{layout:6}  {name:16} {t_fast * 1e3:10.2f} {nbytes / t_fast / 1e9:7.1f} "
              f"{t_ref * 1e3:13.1f} {t_ref / t_fast:8.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastbn``: check fastbn against the NumPy reference, then time it.

``python -m fastbn bench`` runs the full comparison instead (see :mod:`fastbn.bench_report`;
``--small`` for the small layers, ``--step`` for whole training steps with PyTorch), and
``python -m fastbn warmup`` fills Numba's disk cache ahead of time (see :mod:`fastbn._warmup`).

The plain invocation prints one table: for each layout and pass, fastbn's time (ms), its effective bandwidth
(traffic model: training forward reads x twice and writes y = 3 tensor passes; backward
reads x and dy twice and writes dx = 5 passes), the reference's time and the speed-up.
"""

import argparse
import sys
import time

import numba
import numpy as np

import fastbn
from fastbn import bench as fbench
from fastbn.bench_report import BENCH_DOC, bench_main
from fastbn._warmup import WARMUP_DOC, warmup_main
from fastbn import reference

DEFAULT_SHAPE = (32, 64, 56, 56)


def gpu_description():
    """One line naming the GPU fastbn's CUDA backend would use, or None (no CUDA here)."""
    try:
        from numba import cuda
        if not (numba.config.ENABLE_CUDASIM or cuda.is_available()):
            return None
        from fastbn import cuda as fastbn_cuda
    except Exception:  # a broken CUDA install must not break the CPU report
        return None
    return fastbn_cuda.describe()


def check(shape, dtype, on_gpu=False):
    """Max relative error of fastbn's y and dx against the float64 reference, per layout
    (inputs copied to the GPU first when ``on_gpu``)."""
    errors = {}
    for layout in fbench.LAYOUTS:
        x, dy, weight, bias, _, _ = fbench.make_inputs(shape, layout, dtype)
        if on_gpu:
            from numba import cuda
            args = [cuda.to_device(a) for a in (x, dy, weight, bias)]
            y, mean, invstd = fastbn.batch_norm_forward(args[0], args[2], args[3], layout=layout)
            dx, _, _ = fastbn.batch_norm_backward(args[1], args[0], mean, invstd, args[2], layout=layout)
            y, mean, invstd, dx = (a.copy_to_host() for a in (y, mean, invstd, dx))
        else:
            y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, layout=layout)
            dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(x64, weight, bias, layout=layout)
        dx_ref, _, _ = reference.batch_norm_backward(dy64, x64, mean_ref, invstd_ref, weight, layout=layout)
        errors[layout] = max(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)),
                             np.max(np.abs(dx - dx_ref)) / np.max(np.abs(dx_ref)))
    return errors


def timing_rows(shape, dtype, repeat):
    """Yield (layout, pass, fastbn s, reference s, bytes moved) for the default report."""
    for layout in fbench.LAYOUTS:
        x, dy, weight, bias, rm, rv = fbench.make_inputs(shape, layout, dtype)
        y_buf, dx_buf = np.empty_like(x), np.empty_like(x)
        _, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, layout=layout)
        passes = {
            "forward (train)": (3, lambda: fastbn.batch_norm_forward(
                x, weight, bias, running_mean=rm, running_var=rv, layout=layout, out=y_buf),
                lambda: reference.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                                     layout=layout)),
            "backward": (5, lambda: fastbn.batch_norm_backward(
                dy, x, mean, invstd, weight, layout=layout, out=dx_buf),
                lambda: reference.batch_norm_backward(dy, x, mean, invstd, weight, layout=layout)),
        }
        for name, (tensor_passes, run_fastbn, run_reference) in passes.items():
            yield (layout, name, fbench.best_time(run_fastbn, repeat),
                   fbench.best_time(run_reference, max(1, repeat // 5)), tensor_passes * x.nbytes)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)),
                        help="N,C,H,W (NCHW order; NHWC uses the same sizes); default %(default)s")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per measurement")
    sub = parser.add_subparsers(dest="command", metavar="{bench,warmup}")
    warm = sub.add_parser("warmup", help="compile fastbn's CPU kernels into Numba's on-disk cache",
                          description=WARMUP_DOC)
    warm.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    warm.add_argument("--layouts", nargs="+", default=list(fbench.LAYOUTS), choices=list(fbench.LAYOUTS))
    warm.add_argument("--first-call", type=int, default=0, metavar="N",
                      help="instead: time N new processes to their first forward and backward result")
    bench = sub.add_parser(
        "bench", help="compare fastbn with the NumPy reference and PyTorch CPU, against a measured roofline",
        description=BENCH_DOC)
    bench.add_argument("--shapes", nargs="+", metavar="SHAPE",
                       help="shapes in NCHW order, e.g. 32,64,56,56 4096,1024, or a named set: "
                            f"{', '.join(fbench.SHAPE_SETS)} (default: suite)")
    bench.add_argument("--small", action="store_true",
                       help="the small shapes (" + " ".join(map(fbench.shape_label, fbench.SMALL_SHAPES))
                            + "), per-call times in us; ops default to forward_train forward_eval backward")
    bench.add_argument("--op", default="batch", choices=["batch", "layer", "group", "instance"],
                       help="the normalization compared: batch (default) or layer/group/instance norm against "
                            "PyTorch (fastbn.bench_norms)")
    bench.add_argument("--dtype", dest="bench_dtypes", nargs="+", default=["float32"],
                       choices=["float32", "float64", "float16", "bfloat16"],
                       help="storage dtype(s); several: a table each, then GB/s side by side (bfloat16 needs "
                            "ml_dtypes; the training-step and norm comparisons take one)")
    bench.add_argument("--ops", nargs="+", default=None, choices=list(fbench.OPS), metavar="OP",
                       help=f"subset of {', '.join(fbench.OPS)}")
    bench.add_argument("--layouts", nargs="+", default=list(fbench.LAYOUTS), choices=list(fbench.LAYOUTS))
    bench.add_argument("--threads", type=int, default=None, help="threads for Numba and PyTorch (default: Numba's)")
    bench.add_argument("--quick", action="store_true", help="one round, fewer repetitions; the reference runs once")
    bench.add_argument("--rounds", type=int, default=3,
                       help="interleaved timing rounds per shape, best kept (default %(default)s)")
    bench.add_argument("--no-reference", action="store_true", help="skip the (slow) NumPy reference")
    bench.add_argument("--step", action="store_true",
                       help="instead: time a training step (small CNN in NCHW and channels_last, MLP) in native "
                            "torch and after fastbn.torch.convert, and the batch-norm share of each (needs torch)")
    bench.add_argument("--steps", type=int, default=20, help="--step: steps per timing (default %(default)s)")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    bench.add_argument("--plot", metavar="FILE.png", help="bar chart of GB/s against the roofline (needs matplotlib)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench_main(args)
    if args.command == "warmup":
        return warmup_main(args)
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = np.dtype(args.dtype)

    print(f"fastbn {fastbn.__version__}, numba {numba.__version__}, numpy {np.__version__}, "
          f"{numba.get_num_threads()} threads")
    t0 = time.perf_counter()
    errors = check((4, 8, 9, 7), dtype)
    print(f"check against the float64 reference (first call, JIT or disk cache: "
          f"{time.perf_counter() - t0:.1f} s): "
          + ", ".join(f"{layout} max rel. error {err:.1e}" for layout, err in errors.items()))
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    ok = all(err < tolerance for err in errors.values())
    gpu = gpu_description()
    if gpu is None:
        print("GPU: none usable by numba.cuda here (CPU backend only)")
    else:
        gpu_errors = check((4, 8, 9, 7), dtype, on_gpu=True)
        ok = ok and all(err < tolerance for err in gpu_errors.values())
        print(f"GPU: {gpu}; check against the reference: "
              + ", ".join(f"{layout} max rel. error {err:.1e}" for layout, err in gpu_errors.items()))
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

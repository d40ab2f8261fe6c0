"""``python -m fastbn bench``: the comparison report (fastbn, the NumPy reference and
PyTorch, against a roofline measured per case), its table, legend, JSON and plot."""

import sys
import time

import numba
import numpy as np

import fastbn
from fastbn import bench as fbench
from fastbn import bench_roofline
from fastbn import bench_step

#: Pause before each timed case (see bench_rows): lets the other pool's spinning workers sleep.
IDLE_PAUSE_S = 0.05

BENCH_DOC = """Time every op (batch statistics, training forward, eval forward, backward) in both
layouts: fastbn's best time, its effective bandwidth (traffic model: stats 1, training
forward 3, eval forward 2, backward 5 tensor passes), the percentage of a roofline
measured right after each case over the case's own arrays (the same traffic as plain read
and copy passes, fastbn.bench_roofline.case_roofline), whether the case fits in the last-level
cache ("in-cache") or not ("DRAM"), and the speed-up over the float64 NumPy reference and
over PyTorch CPU (F.batch_norm; NHWC against channels_last) when torch is installed."""


def _progress(done, total, text):
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""
    if not sys.stderr.isatty():
        if done == total or done * 10 // max(total, 1) != (done - 1) * 10 // max(total, 1):
            sys.stderr.write(f"[{done}/{total}] {text}\n")
        return
    width = 24
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text[:60]:60}")
    sys.stderr.flush()


def progress_total(n_shapes, n_compile, n_timed, rounds):
    """Steps of a report: per shape, one per (layout, op, implementation) prepared, then one
    per timed case in the first round and one per non-reference case in later rounds."""
    return n_shapes * n_compile + n_timed[0] + (rounds - 1) * n_timed[1]


#: % of roofline above which a row is flagged: the bound is timed like the kernel, so a
#: kernel "faster than its bound" means the two timings disagree (load, noise).
ROOF_FLAG = 1.10


def bench_rows(shapes, layouts, ops, dtype, quick=False, with_reference=True, rounds=3,
               progress=_progress, llc_bytes=None):
    """Measure every (shape, layout, op) in ``dtype`` (a dtype, or a list of them to compare
    storage dtypes); yields one dict per case and dtype.

    Per shape, every case is prepared (inputs shared by the implementations), then timed
    in ``rounds`` interleaved rounds, keeping each one's best per-call time (batches of
    calls for microsecond cases, see fastbn._timing.best_per_call): a burst of load from
    other processes then spoils one round, not a case, and with several dtypes not one
    dtype's timings.  The roofline of each case is measured right after fastbn's timing of
    it, in every round (best kept), over the case's own arrays (same bytes, same cache
    state; see fastbn.bench_roofline.case_roofline).  The NumPy reference (slow) is timed in the
    first round only.
    """
    dtypes = [np.dtype(d) for d in dtype] if isinstance(dtype, (list, tuple)) else [np.dtype(dtype)]
    impls = fbench.available_implementations()
    if not with_reference:
        impls.pop("numpy", None)
    llc_bytes = llc_bytes or bench_roofline.last_level_cache_bytes()
    repeat, min_time = (3, 0.02) if quick else (10, 0.1)
    rounds = 1 if quick else max(1, rounds)
    # Count the cases each shape will time, so the progress total is exact.
    timed_first = timed_later = 0
    for shape in shapes:
        for each in dtypes:
            for layout in layouts:
                for op in ops:
                    for name, cls in impls.items():
                        if cls().supports(op, layout, shape, each):
                            timed_first += 1
                            timed_later += name != "numpy"
    total = progress_total(len(shapes), len(dtypes) * len(layouts) * len(ops) * len(impls),
                           (timed_first, timed_later), rounds)
    done = 0

    def step(text):
        nonlocal done
        progress(min(done, total), total, text)
        done += 1

    for shape in shapes:
        fbench.sharing_inputs(True)
        cases = []
        for each in dtypes:
            for layout in layouts:
                for op in ops:
                    for name, cls in impls.items():
                        impl = cls()
                        step(f"compile {name} {op} {layout} {fbench.shape_label(shape)} {each.name}")
                        if impl.supports(op, layout, shape, each):
                            fn = impl.prepare(op, layout, shape, each)
                            fn()
                            cases.append((each, layout, op, name, fn))
        best = {}
        roofs = {}
        for r in range(rounds):
            for each, layout, op, name, fn in cases:
                if name == "numpy" and r > 0:
                    continue
                step(f"round {r + 1}/{rounds} {name} {op} {layout} {fbench.shape_label(shape)} {each.name}")
                # PyTorch and Numba each keep an OpenMP pool whose idle workers spin for a
                # while before sleeping; a pause lets the other pool go to sleep first, so
                # each implementation is timed with the cores to itself, in its default
                # configuration (no OMP_WAIT_POLICY forced on either).
                time.sleep(IDLE_PAUSE_S)
                if name == "numpy":
                    t = fbench.best_time(fn, 1 if quick else 3, 0.0, max_time=2.0)
                else:
                    t = fbench.best_per_call(fn, repeat, min_time)
                key = (each, layout, op, name)
                best[key] = min(best.get(key, float("inf")), t)
                if name == "fastbn":
                    # The bound right after the case it bounds, over the same arrays: this
                    # machine's bandwidth drifts over a run, and a bound measured at another
                    # moment or on other bytes can read below the kernel it is meant to bound.
                    x, dy, _, _, _, _ = fbench.shared_inputs(shape, layout, each)
                    out = fbench.shared_output(shape, layout, each)
                    roof = bench_roofline.case_roofline(op, x, dy, out, repeat, min_time)
                    roofs[(each, layout, op)] = min(roofs.get((each, layout, op), float("inf")), roof)
        del cases
        fbench.sharing_inputs(False)
        for each in dtypes:
            for layout in layouts:
                for op in ops:
                    if (each, layout, op, "fastbn") not in best:
                        continue
                    yield _row(shape, layout, op, each, llc_bytes, impls,
                               {name: best[(each, layout, op, name)] for name in impls
                                if (each, layout, op, name) in best}, roofs[(each, layout, op)])
    progress(total, total, "done")
    if sys.stderr.isatty():
        sys.stderr.write("\n")


def _row(shape, layout, op, dtype, llc_bytes, impls, times, roofline_s):
    """One report row: the case, each implementation's time (``times``: name -> s) and
    the derived bandwidths and ratios."""
    row = {"shape": list(shape), "layout": layout, "op": op, "dtype": np.dtype(dtype).name,
           "threads": numba.get_num_threads(), "bytes": fbench.traffic_bytes(op, shape, dtype),
           "footprint_bytes": bench_roofline.footprint_bytes(op, shape, dtype),
           "llc_bytes": llc_bytes, "cache": bench_roofline.cache_label(op, shape, dtype, llc_bytes)}
    for name in impls:
        if name in times:
            row[f"{name}_s"] = times[name]
    row["roofline_s"] = roofline_s
    row["gbps"] = row["bytes"] / row["fastbn_s"] / 1e9
    row["roofline_gbps"] = row["bytes"] / row["roofline_s"] / 1e9
    row["roofline_fraction"] = row["roofline_s"] / row["fastbn_s"]
    row["roofline_suspect"] = row["roofline_fraction"] > ROOF_FLAG
    for name in impls:
        if name != "fastbn" and f"{name}_s" in row:
            row[f"speedup_vs_{name}"] = row[f"{name}_s"] / row["fastbn_s"]
    return row


def time_unit(rows):
    """("us", 1e6) when most fastbn times are under a millisecond, else ("ms", 1e3)."""
    if rows and sorted(r["fastbn_s"] for r in rows)[len(rows) // 2] < 1e-3:
        return "us", 1e6
    return "ms", 1e3


def format_table(rows):
    names = [k[len("speedup_vs_"):] for k in rows[0] if k.startswith("speedup_vs_")] if rows else []
    unit, scale = time_unit(rows)
    header = (f"{'shape':16} {'layout':6} {'op':13} {'cache':8} {'fastbn ' + unit:>9} {'GB/s':>6} "
              f"{'roof GB/s':>9} {'% roof':>7}" + "".join(f" {name + ' ' + unit:>9} {'vs ' + name:>9}"
                                                       for name in names))
    lines = [header, "-" * len(header)]
    for r in rows:
        flag = "*" if r.get("roofline_suspect") else " "
        line = (f"{fbench.shape_label(r['shape']):16} {r['layout']:6} {r['op']:13} {r['cache']:8} "
                f"{r['fastbn_s'] * scale:9.3f} {r['gbps']:6.1f} {r['roofline_gbps']:9.1f} "
                f"{100 * r['roofline_fraction']:5.0f}%{flag}")
        for name in names:
            if f"{name}_s" in r:
                line += f" {r[name + '_s'] * scale:9.3f} {r['speedup_vs_' + name]:8.2f}x"
            else:
                line += f" {'-':>9} {'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def format_dtype_table(rows, dtype_names):
    """fastbn's effective GB/s per storage dtype, side by side, and each dtype's time as a
    fraction of the first one's (16-bit storage moves half float32's bytes: 0.50 is the
    bandwidth-bound ideal against float32)."""
    first = dtype_names[0]
    by_case = {}
    for r in rows:
        by_case.setdefault((tuple(r["shape"]), r["layout"], r["op"]), {})[r["dtype"]] = r
    header = (f"{'shape':16} {'layout':6} {'op':13}" + "".join(f" {name + ' GB/s':>13}" for name in dtype_names)
              + "".join(f" {'t ' + name + '/' + first:>18}" for name in dtype_names[1:]))
    lines = [header, "-" * len(header)]
    for (shape, layout, op), per_dtype in by_case.items():
        line = f"{fbench.shape_label(shape):16} {layout:6} {op:13}"
        for name in dtype_names:
            line += f" {per_dtype[name]['gbps']:13.1f}" if name in per_dtype else f" {'-':>13}"
        for name in dtype_names[1:]:
            if name in per_dtype and first in per_dtype:
                line += f" {per_dtype[name]['fastbn_s'] / per_dtype[first]['fastbn_s']:18.2f}"
            else:
                line += f" {'-':>18}"
        lines.append(line)
    lines.append(f"t <dtype>/{first}: fastbn's time in that dtype / its time in {first} (same shape, layout, "
                 "op); 0.50 is the bandwidth-bound ideal for 16-bit against float32.")
    return "\n".join(lines)


def table_legend(rows, llc_bytes):
    """What each column of :func:`format_table` means (printed under the table)."""
    lines = [
        "GB/s: traffic model (stats 1, forward_train 3, forward_eval 2, backward 5 tensor passes) / fastbn's time.",
        "roof: the same traffic as plain data movement (read passes, then a copy pass) over the case's own arrays, "
        "timed the same way right after the case (faster of a serial and a parallel probe); "
        "% roof = roof time / fastbn time.",
        f"cache: 'in-cache' when the op's footprint (distinct bytes: stats x; forward x, y; backward dy, x, dx) fits "
        f"in the last-level cache ({llc_bytes / 2**20:.0f} MiB), else 'DRAM': in-cache GB/s are cache speeds.",
        "vs numpy: the float64 NumPy reference's time (fastbn.reference, inputs upcast to float64) / fastbn's time; "
        "vs torch: PyTorch CPU's time (F.batch_norm without autograd; backward: aten.native_batch_norm_backward, "
        "the kernel alone, as for fastbn) / fastbn's time. Times are the best per-call time (batches of calls "
        "for microsecond cases).",
    ]
    if any(r.get("roofline_suspect") for r in rows):
        lines.append(f"*: above {100 * ROOF_FLAG:.0f}% of roof, i.e. the kernel and its bound were timed under "
                     "different load; rerun on a quiet machine.")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return False
    labels = [f"{fbench.shape_label(r['shape'])}\n{r['layout']} {r['op']}" for r in rows]
    xs = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 5))
    ax.bar(xs, [r["gbps"] for r in rows], label="fastbn effective GB/s")
    ax.scatter(xs, [r["roofline_gbps"] for r in rows], marker="_", s=300, color="k", zorder=3,
               label="roofline (measured read + copy passes)")
    if any("torch_s" in r for r in rows):
        ax.scatter(xs, [r["bytes"] / r["torch_s"] / 1e9 if "torch_s" in r else np.nan for r in rows],
                   marker="o", color="C3", zorder=3, label="PyTorch CPU")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("effective GB/s (traffic model)")
    ax.set_title(f"fastbn, {rows[0]['dtype']}, {rows[0]['threads']} threads" if rows else "fastbn")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _write_json(doc, path):
    import json
    if path == "-":
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)


def step_main(args, dtype):
    """``bench --step``: the training-step comparison (fastbn.bench.step_rows)."""
    import os

    if not fbench.Torch.available():
        print("--step needs PyTorch (pip install torch)", file=sys.stderr)
        return 2
    if dtype != np.float32:
        print("--step runs in float32 (the models' dtype)", file=sys.stderr)
    env = {k: os.environ.get(k) for k in bench_step.THREAD_ENV}
    print("thread settings: " + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in env.items()))
    steps, rounds = (3, 1) if args.quick else (max(1, args.steps), max(1, args.rounds))
    rows = list(bench_step.step_rows(steps=steps, rounds=rounds, progress=_progress))
    print(f"threading layer: numba {numba.threading_layer()}; "
          f"{numba.get_num_threads()} Numba threads, {rows[0]['threads']} torch threads; "
          f"{steps} steps per timing, best of {rounds} rounds")
    print(bench_step.format_step_table(rows))
    print(bench_step.STEP_LEGEND)
    worst = max(r["output_rel_diff"] for r in rows)
    print(f"same initial weights: max relative difference of the two models' outputs before training {worst:.1e}")
    if args.json:
        _write_json({"fastbn": fastbn.__version__, "threads": numba.get_num_threads(), "env": env,
                     "threading_layer": numba.threading_layer(), "steps": steps, "rounds": rounds,
                     "rows": rows}, args.json)
    return 0


def bench_main(args):
    import json
    import platform

    if args.threads is not None:
        numba.set_num_threads(args.threads)
    dtypes = [fbench.parse_dtype(name) for name in dict.fromkeys(args.bench_dtypes)]
    dtype = dtypes[0]
    small = args.small or args.shapes == ["small"]
    if args.small:
        shapes = list(fbench.SMALL_SHAPES) + (fbench.parse_shapes(args.shapes) if args.shapes else [])
    else:
        shapes = fbench.parse_shapes(args.shapes) if args.shapes else list(fbench.shapes())
    ops = args.ops or (["forward_train", "forward_eval", "backward"] if small else list(fbench.OPS))
    if fbench.Torch.available():
        import torch
        torch.set_num_threads(numba.get_num_threads())
        torch_version = torch.__version__
    else:
        torch_version = None
    print(f"fastbn {fastbn.__version__}, numba {numba.__version__}, numpy {np.__version__}, "
          f"torch {torch_version or 'not installed'}; {numba.get_num_threads()} threads, "
          f"{', '.join(d.name for d in dtypes)}, {platform.machine()}")
    if (args.step or getattr(args, "op", "batch") != "batch") and len(dtypes) > 1:
        print("--step and --op other than batch take one --dtype", file=sys.stderr)
        return 2
    if args.step:
        return step_main(args, dtype)
    if getattr(args, "op", "batch") != "batch":
        from .bench_norms import norms_main
        return norms_main(args, dtype, fbench.parse_shapes, fbench.smoke())
    llc_bytes = bench_roofline.last_level_cache_bytes()
    rows = list(bench_rows(shapes, args.layouts, ops, dtypes, quick=args.quick,
                           with_reference=not args.no_reference, rounds=args.rounds, llc_bytes=llc_bytes))
    for each in dtypes:
        if len(dtypes) > 1:
            print(f"\n{each.name}:")
        print(format_table([r for r in rows if r["dtype"] == each.name]))
    print(table_legend(rows, llc_bytes))
    if len(dtypes) > 1:
        print()
        print(format_dtype_table(rows, [d.name for d in dtypes]))
    if args.json:
        doc = {"fastbn": fastbn.__version__, "numba": numba.__version__, "numpy": np.__version__,
               "torch": torch_version, "threads": numba.get_num_threads(), "dtype": dtype.name,
               "dtypes": [d.name for d in dtypes],
               "machine": platform.machine(), "processor": platform.processor(), "llc_bytes": llc_bytes,
               "rows": rows}
        if args.json == "-":
            json.dump(doc, sys.stdout, indent=1)
            print()
        else:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    if args.plot and rows:
        if plot(rows, args.plot):
            print(f"plot written to {args.plot}")
    return 0

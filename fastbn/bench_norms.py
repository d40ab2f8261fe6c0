"""``python -m fastbn bench --op {layer,group,instance}``: fastbn's layer, group and
instance norm against PyTorch's CPU kernels in the same run (and the asv suite
``benchmarks/bench_norms.py``).

One table drives both: :data:`NORM_IMPLEMENTATIONS` maps a name to a class whose
``prepare(op, direction, layout, shape, dtype)`` builds the inputs once and returns a
zero-argument callable.  ``direction`` is ``forward`` (statistics and y) or ``backward``
(dx, dweight, dbias from saved statistics: ATen's ``native_*_backward`` for torch, the
gradient of ``instance_norm`` for torch's instance norm, which has no native backward of
its own).  Shapes are NCHW-ordered; ``NHWC`` is channel-last memory (torch:
``channels_last``).  Layer norm normalizes the last dimension.
"""

import importlib.util

import numpy as np

import fastbn
from fastbn._timing import best_per_call

NORM_OPS = ("layer", "group", "instance")
DIRECTIONS = ("forward", "backward")
#: The issue's speed-target shapes.
NORM_SHAPES = {"layer": ((12608, 768), (4096, 1024), (256, 64)),
               "group": ((8, 256, 64, 64), (16, 128, 32, 32)),
               "instance": ((8, 64, 128, 128),)}
NORM_SMOKE_SHAPES = {"layer": ((64, 48),), "group": ((2, 8, 6, 6),), "instance": ((2, 4, 6, 6),)}
NUM_GROUPS = 32


def layouts(op):
    """Memory orders benchmarked: layer norm has one ("-", C order)."""
    return ("-",) if op == "layer" else ("NCHW", "NHWC")


def _groups(op, shape):
    return shape[1] if op == "instance" else min(NUM_GROUPS, shape[1])


def _inputs(op, layout, shape, dtype):
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    params = shape[-1:] if op == "layer" else shape[1:2]
    weight = rng.uniform(0.5, 1.5, params).astype(dtype)
    bias = rng.uniform(-0.5, 0.5, params).astype(dtype)
    if layout == "NHWC":
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
    return x, dy, weight, bias


class FastbnNorms:
    """fastbn's public functions (outputs preallocated with ``out=`` where they take it)."""

    name = "fastbn"

    @classmethod
    def available(cls):
        return True

    def prepare(self, op, direction, layout, shape, dtype):
        x, dy, weight, bias = _inputs(op, layout, shape, dtype)
        out = np.empty_like(x)
        if op == "layer":
            normalized = x.shape[-1:]
            _, mean, invstd = fastbn.layer_norm_forward(x, normalized, weight, bias)
            if direction == "forward":
                return lambda: fastbn.layer_norm_forward(x, normalized, weight, bias, out=out)
            return lambda: fastbn.layer_norm_backward(dy, x, normalized, mean, invstd, weight, out=out)
        groups = _groups(op, shape)
        affine = op == "group"  # torch.nn.InstanceNorm2d's default is affine=False
        w, b = (weight, bias) if affine else (None, None)
        _, mean, invstd = fastbn.group_norm_forward(x, groups, w, b, layout=layout)
        if direction == "forward":
            if op == "instance":
                return lambda: fastbn.instance_norm(x, layout=layout)
            return lambda: fastbn.group_norm_forward(x, groups, w, b, layout=layout, out=out)
        return lambda: fastbn.group_norm_backward(dy, x, groups, mean, invstd, w, layout=layout, out=out)


class TorchNorms:
    """PyTorch CPU: ``aten.native_layer_norm``/``native_group_norm`` and their native
    backwards; ``F.instance_norm`` and its autograd backward."""

    name = "torch"

    @classmethod
    def available(cls):
        return importlib.util.find_spec("torch") is not None

    def prepare(self, op, direction, layout, shape, dtype):
        import torch
        aten = torch.ops.aten
        x, dy, weight, bias = (torch.from_numpy(np.ascontiguousarray(a)) for a in _inputs(op, "NCHW", shape, dtype))
        if layout == "NHWC":
            x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
        if op == "layer":
            normalized = list(shape[-1:])
            _, mean, rstd = aten.native_layer_norm(x, normalized, weight, bias, 1e-5)
            if direction == "forward":
                return lambda: aten.native_layer_norm(x, normalized, weight, bias, 1e-5)
            return lambda: aten.native_layer_norm_backward(dy, x, normalized, mean, rstd, weight, bias,
                                                           [True, True, True])
        if op == "instance":
            xg = x.clone().requires_grad_(True)
            if direction == "forward":
                return lambda: torch.nn.functional.instance_norm(x)
            y = torch.nn.functional.instance_norm(xg)
            return lambda: torch.autograd.grad(y, xg, dy, retain_graph=True)
        n, c = shape[0], shape[1]
        spatial = int(np.prod(shape[2:]))
        groups = _groups(op, shape)
        _, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, spatial, groups, 1e-5)
        if direction == "forward":
            return lambda: aten.native_group_norm(x, weight, bias, n, c, spatial, groups, 1e-5)
        return lambda: aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, spatial, groups,
                                                       [True, True, True])


NORM_IMPLEMENTATIONS = {"fastbn": FastbnNorms, "torch": TorchNorms}


def norm_rows(op, shapes, dtype, rounds=3):
    """Rows ``{op, shape, layout, direction, fastbn_ms, torch_ms, speedup}`` (torch
    entries None without torch), the best of ``rounds`` interleaved timings."""
    impls = {name: cls() for name, cls in NORM_IMPLEMENTATIONS.items() if cls.available()}
    for shape in shapes:
        for layout in layouts(op):
            for direction in DIRECTIONS:
                fns = {name: impl.prepare(op, direction, layout, shape, dtype) for name, impl in impls.items()}
                best = dict.fromkeys(fns, float("inf"))
                for _ in range(rounds):  # interleaved: a burst of load hits both sides alike
                    for name, fn in fns.items():
                        best[name] = min(best[name], best_per_call(fn, repeat=10, min_time=0.1))
                torch_ms = best["torch"] * 1e3 if "torch" in best else None
                fast_ms = best["fastbn"] * 1e3
                yield {"op": op, "shape": "x".join(map(str, shape)), "layout": layout, "direction": direction,
                       "fastbn_ms": fast_ms, "torch_ms": torch_ms,
                       "speedup": None if torch_ms is None else torch_ms / fast_ms}


def format_norm_rows(rows):
    header = f"{'op':9} {'shape':16} {'layout':6} {'pass':9} {'fastbn ms':>10} {'torch ms':>10} {'torch/fastbn':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        torch_ms = "-" if r["torch_ms"] is None else f"{r['torch_ms']:10.3f}"
        ratio = "-" if r["speedup"] is None else f"{r['speedup']:12.2f}x"
        lines.append(f"{r['op']:9} {r['shape']:16} {r['layout']:6} {r['direction']:9} {r['fastbn_ms']:10.3f} "
                     f"{torch_ms:>10} {ratio:>13}")
    return "\n".join(lines)


def norms_main(args, dtype, parse_shapes, smoke=False):
    """``bench --op layer|group|instance``: print the table (and ``--json``)."""
    import json
    import sys

    shapes = parse_shapes(args.shapes) if args.shapes else list(
        (NORM_SMOKE_SHAPES if smoke else NORM_SHAPES)[args.op])
    rows = list(norm_rows(args.op, shapes, dtype, rounds=1 if args.quick else args.rounds))
    print(format_norm_rows(rows))
    print("torch/fastbn > 1: fastbn is faster (best per-call times, interleaved, same process)")
    doc = {"op": args.op, "dtype": np.dtype(dtype).name, "rows": rows}
    if args.json == "-":
        json.dump(doc, sys.stdout, indent=1)
        print()
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0

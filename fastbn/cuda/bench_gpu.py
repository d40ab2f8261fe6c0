"""Benchmark of the CUDA backend against PyTorch on a real GPU (not the simulator).

    python -m fastbn.cuda.bench_gpu [--check] [--quick] [--iters 50] [--warmup 20]

For every shape of :data:`SHAPES` (ResNet-style batches, a (4096, 1024) matrix, and one
tensor larger than the L2 cache), float32, float16 and bfloat16, NCHW (contiguous) and NHWC
(``channels_last``) memory, it prints per call, in microseconds:

- fastbn and ``torch.nn.functional.batch_norm`` (cuDNN or native, as PyTorch picks)
  training forward, backward (training; torch's through autograd) and eval forward;
- ``call``: CUDA-event time of back-to-back calls after ``--warmup`` warm-up calls,
  host overhead included, rotating over enough input sets that L2 cannot hold them;
- ``kernel``: the same call captured once in a CUDA graph and replayed (host overhead
  removed: the kernels' time);
- GB/s of the bytes the pass must move (training forward reads x twice and writes y;
  eval reads x and writes y; backward reads dy and x twice and writes dx) and that as a
  percentage of a device-to-device copy's bandwidth over the same tensor.

``--check`` compares every case's fastbn results with torch's first (y, saved
statistics, running statistics, dx, dweight, dbias; torch computing in float32 from the
same 16-bit inputs).  Finally a fastbn
forward+backward is captured inside ``torch.cuda.graph`` and replayed on fresh data,
and checked against a plain call.  fastbn launches on torch's current stream, so the
capture records its kernels.  Requires torch with CUDA and a GPU; the whole default
run takes a few minutes.
"""

import argparse
import dataclasses
import math
import statistics

#: (shape, note): ResNet-50 layers, a (batch, features) matrix, and one beyond L2.
SHAPES = [
    (32, 64, 56, 56),
    (32, 256, 14, 14),
    (64, 512, 7, 7),
    (8, 32, 112, 112),
    (4096, 1024),
    (64, 64, 112, 112),  # 205 MB in float32: larger than any L2
]
DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = ("NCHW", "NHWC")
#: Bytes moved per call, in units of x's bytes (reads + writes).
TRAFFIC = {"train fwd": 3, "eval fwd": 2, "backward": 5}
#: L2 size assumed when the device does not say (H200: 60 MiB).
DEFAULT_L2_BYTES = 60 << 20
MAX_INPUT_SETS = 16


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case and how many input sets its timing rotates over."""

    shape: tuple
    dtype: str
    layout: str
    input_sets: int

    @property
    def itemsize(self):
        return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[self.dtype]

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.itemsize

    @property
    def channels(self):
        return self.shape[1]


def input_sets_for(nbytes, l2_bytes):
    """Input sets to rotate over so that consecutive calls of one set are separated by
    at least 2x the L2 size of other data (x, dy and the outputs count: 3 tensors)."""
    per_set = 3 * nbytes
    return max(2, min(MAX_INPUT_SETS, math.ceil(2 * l2_bytes / per_set) + 1))


def plan_cases(shapes=SHAPES, dtypes=DTYPES, layouts=LAYOUTS, l2_bytes=DEFAULT_L2_BYTES):
    """Every :class:`Case`, dtype-major.  Rank-2 shapes have one layout (channels last
    is their only order), so they appear once per dtype."""
    cases = []
    for dtype in dtypes:
        for layout in layouts:
            for shape in shapes:
                if len(shape) == 2 and layout != LAYOUTS[0]:
                    continue
                nbytes = math.prod(shape) * Case(tuple(shape), dtype, layout, 1).itemsize
                cases.append(Case(tuple(shape), dtype, layout, input_sets_for(nbytes, l2_bytes)))
    return cases


def bandwidth(case, op, seconds):
    """GB/s of ``op`` (a :data:`TRAFFIC` key, or "copy": 2) taking ``seconds``."""
    factor = 2 if op == "copy" else TRAFFIC[op]
    return factor * case.nbytes / seconds / 1e9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.cuda.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=50, help="timed calls per sample")
    parser.add_argument("--repeats", type=int, default=3, help="samples per entry (median)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (>= 20 recommended)")
    parser.add_argument("--check", action="store_true", help="compare every case with torch first")
    parser.add_argument("--quick", action="store_true", help="first two shapes, float32 only")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph capture test")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or args.repeats < 1:
        parser.error("--iters and --repeats must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- GPU side

class _Runner:
    """Inputs and the six callables (fastbn / torch x train fwd / backward / eval fwd) of one case."""

    def __init__(self, torch, case):
        import torch.nn.functional as F

        import fastbn

        self.torch, self.case = torch, case
        dtype = getattr(torch, case.dtype)
        fmt = torch.channels_last if (case.layout == "NHWC" and len(case.shape) == 4) else torch.contiguous_format
        layout = "NCHW" if len(case.shape) == 2 else case.layout
        c = case.channels
        self.sets = []
        for _ in range(case.input_sets):
            x = torch.randn(case.shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            dy = torch.randn(case.shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            self.sets.append((x, dy, torch.empty_like(x)))
        self.weight = torch.rand(c, device="cuda") + 0.5
        self.bias = torch.randn(c, device="cuda")
        self.running_mean = torch.zeros(c, device="cuda")
        self.running_var = torch.ones(c, device="cuda")
        self.index = 0
        # fastbn takes an NHWC tensor's logical NHWC view (channels last in its shape).
        self.fb = [(self._fb_view(x), self._fb_view(dy)) for x, dy, _ in self.sets]
        self.fb_layout = "NHWC" if case.layout == "NHWC" and len(case.shape) == 4 else layout
        w, b, rm, rv = self.weight, self.bias, self.running_mean, self.running_var
        _, self.save_mean, self.save_invstd = fastbn.batch_norm_forward(
            self.fb[0][0], w, b, running_mean=rm, running_var=rv, layout=self.fb_layout)
        self.torch_grads = []
        for x, dy, _ in self.sets:
            xg = x.detach().requires_grad_(True)
            wg, bg = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
            self.torch_grads.append((F.batch_norm(xg, rm.clone(), rv.clone(), wg, bg, training=True), (xg, wg, bg), dy))

        def nxt():
            self.index = (self.index + 1) % case.input_sets
            return self.index

        L = self.fb_layout
        self.calls = {
            ("fastbn", "train fwd"): lambda: fastbn.batch_norm_forward(
                self.fb[nxt()][0], w, b, running_mean=rm, running_var=rv, layout=L),
            ("fastbn", "backward"): lambda: fastbn.batch_norm_backward(
                self.fb[nxt()][1], self.fb[self.index][0], self.save_mean, self.save_invstd, w, layout=L),
            ("fastbn", "eval fwd"): lambda: fastbn.batch_norm_forward(
                self.fb[nxt()][0], w, b, running_mean=rm, running_var=rv, training=False, layout=L),
            ("torch", "train fwd"): lambda: F.batch_norm(self.sets[nxt()][0], rm, rv, w, b, training=True),
            ("torch", "backward"): lambda: torch.autograd.grad(
                self.torch_grads[nxt()][0], self.torch_grads[self.index][1], self.torch_grads[self.index][2],
                retain_graph=True),
            ("torch", "eval fwd"): lambda: F.batch_norm(self.sets[nxt()][0], rm, rv, w, b, training=False),
            ("copy", "copy"): lambda: self.sets[nxt()][2].copy_(self.sets[self.index][0]),
        }

    def _fb_view(self, t):
        if self.case.layout == "NHWC" and t.dim() == 4:
            return t.permute(0, 2, 3, 1)  # dense in memory: a channels_last tensor
        return t


def _time_call_us(torch, fn, iters, repeats, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(samples)


def _time_kernel_us(torch, fn, iters, repeats):
    """Time of one call's kernels: the call captured in a CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm on the capture stream (fastbn's workspace is per stream)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            fn()
    except Exception:  # e.g. autograd's backward is not capturable this way
        return float("nan")
    return _time_call_us(torch, graph.replay, iters, repeats, 3)


def check_case(torch, runner, atol):
    """Compare fastbn's training forward, backward and eval with torch's; raise on a mismatch."""
    import torch.nn.functional as F

    import fastbn

    x, dy, _ = runner.sets[0]
    fx, fdy = runner.fb[0]
    w, b = runner.weight, runner.bias
    rm_f, rv_f = runner.running_mean.clone(), runner.running_var.clone()
    rm_t, rv_t = rm_f.clone(), rv_f.clone()
    y, mean, invstd = fastbn.batch_norm_forward(fx, w, b, running_mean=rm_f, running_var=rv_f,
                                                layout=runner.fb_layout)
    xg = x.detach().float().requires_grad_(True)
    wg, bg = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
    y_t = F.batch_norm(xg, rm_t, rv_t, wg, bg, training=True)
    dx_t, dw_t, db_t = torch.autograd.grad(y_t, (xg, wg, bg), dy.float())
    dx, dw, db = fastbn.batch_norm_backward(fdy, fx, mean, invstd, w, layout=runner.fb_layout)
    ye, _, _ = fastbn.batch_norm_forward(fx, w, b, running_mean=rm_t, running_var=rv_t, training=False,
                                         layout=runner.fb_layout)
    ye_t = F.batch_norm(x.float(), rm_t, rv_t, w, b, training=False)
    view = runner._fb_view
    pairs = {"y": (y, view(y_t)), "running_mean": (rm_f, rm_t), "running_var": (rv_f, rv_t),
             "dx": (dx, view(dx_t)), "dweight": (dw, dw_t), "dbias": (db, db_t), "eval y": (ye, view(ye_t))}
    for name, (got, want) in pairs.items():
        got, want = got.double(), want.double()
        scale = want.abs().max().item() + 1.0
        err = (got - want).abs().max().item()
        if not err <= atol * scale * (1 if name not in ("dweight", "dbias") else math.sqrt(x.numel())):
            raise AssertionError(f"{runner.case}: {name} differs from torch by {err:.3g} (scale {scale:.3g})")


def graph_capture(torch):
    """Capture fastbn forward+backward in ``torch.cuda.graph``, replay on new data, compare."""
    import fastbn

    shape = (8, 16, 14, 14)
    x = torch.randn(shape, device="cuda")
    dy = torch.randn(shape, device="cuda")
    w, b = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")

    def step():
        y, mean, invstd = fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv)
        dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
        return y, dx, dw, db

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm: compilation, workspace
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = step()
    x.copy_(torch.randn(shape, device="cuda") * 2 + 1)
    dy.copy_(torch.randn(shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    rm2, rv2 = rm.clone(), rv.clone()
    expected = fastbn.batch_norm_forward(x, w, b, running_mean=rm2, running_var=rv2)[0]
    err = (captured[0] - expected).abs().max().item()
    return err


def main(argv=None):
    args = parse_args(argv)
    import torch

    import fastbn.cuda

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs PyTorch with CUDA and a GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES
    shapes = SHAPES[:2] if args.quick else SHAPES
    dtypes = ["float32"] if args.quick else args.dtypes
    cases = plan_cases(shapes, dtypes, args.layouts, l2)
    print(f"# {fastbn.cuda.describe()}; torch {torch.__version__}; L2 {l2 >> 20} MiB; per-call us "
          f"(median of {args.repeats} x {args.iters} calls after {args.warmup} warm-up, rotating input sets)")
    ops = ("train fwd", "backward", "eval fwd")
    header = f"{'shape':>20} {'dtype':>8} {'lay':>4} {'copy':>8}" + "".join(
        f" | {op:>9}: {'fb call':>8} {'fb kern':>8} {'torch':>8} {'GB/s':>6} {'%copy':>5}" for op in ops)
    print(header)
    failures = 0
    for case in cases:
        runner = _Runner(torch, case)
        if args.check:
            try:
                # 16-bit results are rounded to 16 bits (bfloat16: <= 2**-9 relative).
                check_case(torch, runner, 2e-2 if case.itemsize == 2 else 1e-4)
            except AssertionError as error:
                failures += 1
                print(f"CHECK FAILED: {error}")
        copy_us = _time_call_us(torch, runner.calls[("copy", "copy")], args.iters, args.repeats, args.warmup)
        copy_gbs = bandwidth(case, "copy", copy_us * 1e-6)
        row = f"{str(case.shape):>20} {case.dtype:>8} {case.layout:>4} {copy_us:8.1f}"
        for op in ops:
            fb = _time_call_us(torch, runner.calls[("fastbn", op)], args.iters, args.repeats, args.warmup)
            kern = _time_kernel_us(torch, runner.calls[("fastbn", op)], args.iters, args.repeats)
            tt = _time_call_us(torch, runner.calls[("torch", op)], args.iters, args.repeats, args.warmup)
            gbs = bandwidth(case, op, fb * 1e-6)
            row += f" | {'':>9}  {fb:8.1f} {kern:8.1f} {tt:8.1f} {gbs:6.0f} {100 * gbs / copy_gbs:5.0f}"
        print(row, flush=True)
        del runner
        torch.cuda.empty_cache()
    if not args.no_graph:
        err = graph_capture(torch)
        print(f"# CUDA graph: fastbn forward+backward captured and replayed; max |y - uncaptured y| = {err:.3g}")
    if failures:
        raise SystemExit(f"{failures} case(s) differ from torch")


if __name__ == "__main__":
    main()

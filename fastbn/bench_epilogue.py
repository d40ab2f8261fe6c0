"""Fused epilogues against the unfused ops, side by side in one run:
``python -m fastbn.bench_epilogue [--threads 2] [--quick]``.

Tables (CPU, float32):

1. fastbn forward and backward on (32, 64, 56, 56) in both layouts: batch norm alone,
   BN+ReLU and BN+add+ReLU fused, and the same followed by separate NumPy passes (what
   an unfused framework does: one more pass per op).
2. PyTorch: ``fastbn.torch.BatchNormAct2d`` (fused) against eager ``BatchNorm2d`` +
   add + ReLU, forward + backward, NCHW and channels_last.
3. A ResNet-style stack (conv-BN-ReLU-conv-BN-add-ReLU x 4, 64 channels, batch 32,
   56x56), one training step (forward, backward): native torch against
   ``fuse(convert(model))``, and the share of the native step spent in normalization
   (the step with every batch norm swapped for ``Identity``, subtracted).
4. ``fastbn.torch.fold`` accuracy: max |folded - eval| / max |eval| on that stack.

Times are the best of ``--repeat`` rounds; in each round every variant of a table runs
once, in turn (interleaved), so a load that comes and goes on a shared machine hits them
alike.
"""

import argparse
import copy
import time

import numpy as np

import fastbn

from .bench import set_threads

SHAPE = (32, 64, 56, 56)


def interleaved_best(cases, repeat):
    """{name: best seconds} of ``cases`` ({name: fn}), timed in turn ``repeat`` times
    after one untimed call each (compilation, page faults)."""
    for fn in cases.values():
        fn()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
TORCH_SHAPES = ((32, 256, 14, 14), (32, 64, 56, 56))


def _arrays(shape, layout, seed=0):
    rng = np.random.default_rng(seed)
    nchw = rng.standard_normal(shape, dtype=np.float32)
    x = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)) if layout == "NHWC" else nchw
    return x, rng.standard_normal(x.shape, dtype=np.float32), rng.standard_normal(x.shape, dtype=np.float32)


def fastbn_rows(layout, repeat):
    """(name, seconds) of the fastbn forward and backward variants on SHAPE."""
    x, residual, dy = _arrays(SHAPE, layout)
    c = SHAPE[1]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    y, out, mask = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    _, mean, invstd = fastbn.batch_norm_forward(x, w, b, layout=layout)
    y_relu, _, _ = fastbn.batch_norm_forward(x, w, b, layout=layout, activation="relu", residual=residual)

    def fwd(**kw):
        return lambda: fastbn.batch_norm_forward(x, w, b, layout=layout, out=y, **kw)

    def fwd_then(add):
        def run():
            fastbn.batch_norm_forward(x, w, b, layout=layout, out=y)
            if add:
                np.add(y, residual, out=y)
            np.maximum(y, 0, out=y)
        return run

    def bwd(**kw):
        return lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, out=out, **kw)

    def bwd_unfused():
        np.greater(y_relu, 0, out=mask)  # the ReLU backward pass: dy * (y > 0)
        np.multiply(dy, mask, out=mask)
        fastbn.batch_norm_backward(mask, x, mean, invstd, w, layout=layout, out=out)

    cases = [("forward BN", fwd()), ("forward BN+ReLU fused", fwd(activation="relu")),
             ("forward BN, then ReLU pass", fwd_then(False)),
             ("forward BN+add+ReLU fused", fwd(activation="relu", residual=residual)),
             ("forward BN, then add, ReLU passes", fwd_then(True)),
             ("backward BN", bwd()), ("backward BN+ReLU fused", bwd(activation="relu", y=y_relu)),
             ("backward BN+add+ReLU fused", bwd(activation="relu", y=y_relu, residual=True)),
             ("backward ReLU pass, then BN", bwd_unfused)]
    best = interleaved_best(dict(cases), repeat)
    return [(name, best[name]) for name, _ in cases]


def torch_rows(repeat):
    """(shape, format, eager seconds, fused seconds) of BN+add+ReLU forward+backward."""
    import torch

    import fastbn.torch as fastbn_torch

    rows = []
    for shape in TORCH_SHAPES:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
            r = torch.randn(shape).to(memory_format=fmt).requires_grad_()
            dy = torch.randn(shape).to(memory_format=fmt)
            eager, fused = torch.nn.BatchNorm2d(shape[1]), fastbn_torch.BatchNormAct2d(shape[1])

            def eager_step():
                torch.relu(eager(x) + r).backward(dy)

            def fused_step():
                fused(x, r).backward(dy)

            name = "channels_last" if fmt is torch.channels_last else "NCHW"
            best = interleaved_best({"eager": eager_step, "fused": fused_step}, repeat)
            rows.append((shape, name, best["eager"], best["fused"]))
    return rows


def resnet_stack(channels=64, blocks=4):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + x)

    return nn.Sequential(*[Block() for _ in range(blocks)])


def _without_batch_norm(model):
    from torch import nn

    model = copy.deepcopy(model)
    for block in model:
        block.bn1, block.bn2 = nn.Identity(), nn.Identity()
    return model


def resnet_rows(repeat, batch=32, size=56):
    """Seconds of one training step (forward + backward) of the stack: native, fused, no BN."""
    import torch

    import fastbn.torch as fastbn_torch

    model = resnet_stack()
    fused = fastbn_torch.fuse(fastbn_torch.convert(copy.deepcopy(model)))
    bare = _without_batch_norm(model)
    x = torch.randn(batch, 64, size, size)

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(x).sum().backward()
        return run

    return interleaved_best({name: step(m) for name, m in
                             (("native", model), ("fastbn fused", fused), ("no batch norm", bare))}, repeat)


def fold_error(batch=8, size=28):
    """max |fold(model)(x) - model(x)| / max |model(x)| of the eval stack, float32."""
    import torch

    import fastbn.torch as fastbn_torch

    model = resnet_stack()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(batch, 64, size, size)
    with torch.no_grad():
        expected = model(x)
        folded = fastbn_torch.fold(model)(x)
    return ((folded - expected).abs().max() / expected.abs().max()).item()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.bench_epilogue", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-torch", action="store_true", help="only the fastbn table")
    args = parser.parse_args(argv)
    repeat = 3 if args.quick else args.repeat
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)
    set_threads(args.threads)
    print(f"threads: {args.threads}; float32; best of {repeat}")
    for layout in ("NCHW", "NHWC"):
        rows = fastbn_rows(layout, repeat)
        base = dict(rows)
        print(f"\nfastbn {SHAPE} {layout}                     ms    vs BN alone")
        for name, seconds in rows:
            ref = base["forward BN" if name.startswith("forward") else "backward BN"]
            print(f"  {name:<36} {seconds * 1e3:8.2f}  {seconds / ref:6.2f}x")
    if args.no_torch:
        return
    print("\nBN+add+ReLU forward+backward         eager ms  fused ms  speedup")
    for shape, fmt, eager, fused in torch_rows(repeat):
        print(f"  {str(shape):<20} {fmt:<14} {eager * 1e3:8.1f}  {fused * 1e3:8.1f}  {eager / fused:6.2f}x")
    step = resnet_rows(max(2, repeat // 3))
    share = 1 - step["no batch norm"] / step["native"]
    print("\nResNet-style stack (4 blocks, 64 ch, batch 32, 56x56), one training step:")
    for name, seconds in step.items():
        print(f"  {name:<16} {seconds * 1e3:8.1f} ms")
    print(f"  native / fused: {step['native'] / step['fastbn fused']:.2f}x; "
          f"normalization share of the native step: {share:.0%}")
    print(f"\nfold: max |folded - eval| / max |eval| = {fold_error():.2e} (float32)")


if __name__ == "__main__":
    main()

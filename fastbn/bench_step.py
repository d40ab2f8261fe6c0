"""The training-step comparison of ``python -m fastbn bench --step``: native PyTorch
against ``fastbn.torch.convert`` of the same model, from the same initial weights,
forward + backward + SGD step, with the batch-norm time of each measured by module hooks.
"""

import time

from .bench import smoke

#: Environment variables that decide how the two thread pools behave; the step report
#: prints them so a run says which settings it was measured under.
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS",
              "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")


def step_model(kind, seed=0):
    """(model, input shape) of the training-step comparison, with seeded initial weights.

    ``cnn``: four blocks conv3x3 -> BatchNorm2d -> ReLU (32, 64, 128, 256 channels, stride
    2 in blocks 2-4), batch 32 of 3x64x64.  ``mlp``: four Linear(512) -> BatchNorm1d ->
    ReLU, batch 256 of 512 features.  In smoke mode (:func:`smoke`) the same structure,
    a few channels and a small batch (checks that the comparison runs)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    tiny = smoke()
    if kind == "cnn":
        cin = 3
        for i, c in enumerate((4, 8, 8, 8) if tiny else (32, 64, 128, 256)):
            layers += [nn.Conv2d(cin, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
        return nn.Sequential(*layers), (4, 3, 16, 16) if tiny else (32, 3, 64, 64)
    if kind == "mlp":
        width = 16 if tiny else 512
        for _ in range(4):
            layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
        return nn.Sequential(*layers), (8 if tiny else 256, width)
    raise ValueError(f"unknown model {kind!r}")


def batch_norm_modules(model):
    """``model``'s batch-norm modules (torch's and fastbn.torch's), in module order."""
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class BatchNormTimer:
    """Wall time spent inside batch-norm modules, forward and backward, from module hooks:
    forward pre-hook to forward hook, and full backward pre-hook (gradient of the output
    ready) to full backward hook (gradient of the input computed).  Used in separate steps
    from the timed ones (hooks cost time of their own)."""

    def __init__(self, model):
        self.seconds = 0.0
        self._handles = []
        self._start = {}
        for m in batch_norm_modules(model):
            self._handles += [m.register_forward_pre_hook(self._begin),
                              m.register_forward_hook(self._end),
                              m.register_full_backward_pre_hook(self._begin),
                              m.register_full_backward_hook(self._end)]

    def _begin(self, module, *args):
        self._start[id(module)] = time.perf_counter()

    def _end(self, module, *args):
        self.seconds += time.perf_counter() - self._start.pop(id(module))

    def remove(self):
        for h in self._handles:
            h.remove()


def batch_norm_inputs(model, x):
    """The input tensors of ``model``'s batch-norm modules in one forward pass on ``x``
    (detached copies, in their memory format), in module order."""
    import torch

    seen = []
    hooks = [m.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone(
                 memory_format=torch.preserve_format)))
             for m in batch_norm_modules(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def batch_norm_alone(model, inputs, steps, rounds):
    """Seconds per step of ``model``'s batch-norm modules run alone (no other torch op
    between them) on their inputs in the step (:func:`batch_norm_inputs`): each module's
    forward and backward with a fixed output gradient, summed over the modules, best of
    ``rounds`` means over ``steps`` passes.  What the step's batch-norm time would be if
    the other layers left no trace (caches, thread pools)."""
    import torch

    cases = []
    for m, x in zip(batch_norm_modules(model), inputs):
        x = x.detach().requires_grad_()  # a leaf of its own over the shared input's memory
        grad = torch.empty_like(x, requires_grad=False).normal_(generator=torch.Generator().manual_seed(2))
        cases.append((m, x, grad))

    def one_pass():
        for m, x, g in cases:
            m(x).backward(g)
            x.grad = None

    one_pass()
    best = float("inf")
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        for _ in range(steps):
            one_pass()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def training_step(model, x, optimizer):
    """One step: forward, a scalar loss, backward, SGD update."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss


def step_cases(memory_formats=("NCHW", "channels_last")):
    """(model kind, memory format) pairs of the comparison (the MLP has no memory format)."""
    return [("cnn", fmt) for fmt in memory_formats] + [("mlp", "-")]


def step_rows(cases=None, steps=10, rounds=3, pause=0.05, progress=None):
    """Time native torch against ``fastbn.torch.convert`` on the same model, from the same
    initial weights, in one process; yields a dict per (model, memory format).

    Per round, each library runs ``steps`` timed steps (its mean per step; best round
    kept), then the same number of steps with :class:`BatchNormTimer` hooks for its
    batch-norm time.  The libraries alternate, with a pause between them so the idle
    workers of one pool can stop spinning before the other starts.
    """
    import copy

    import torch

    import fastbn.torch as fastbn_torch

    cases = cases or step_cases()
    for i, (kind, fmt) in enumerate(cases):
        if progress:
            progress(i, len(cases), f"step {kind} {fmt}")
        native, shape = step_model(kind)
        converted = fastbn_torch.convert(copy.deepcopy(native))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=gen)
        if fmt == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
            native = native.to(memory_format=torch.channels_last)
            converted = converted.to(memory_format=torch.channels_last)
        with torch.no_grad():  # same weights: the two outputs agree before any step
            ref, out = native(x), converted(x)
            output_diff = float((ref - out).abs().max() / ref.abs().max())
        models = {"torch": native, "fastbn": converted}
        opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in models.items()}
        for name in models:  # warm up: compile / load kernels, allocator, autograd graph
            for _ in range(2):
                training_step(models[name], x, opts[name])
        best = {}
        bn = {}
        for _ in range(max(1, rounds)):
            for name, model in models.items():
                time.sleep(pause)
                t0 = time.perf_counter()
                for _ in range(steps):
                    training_step(model, x, opts[name])
                best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / steps)
                time.sleep(pause)
                timer = BatchNormTimer(model)
                t0 = time.perf_counter()
                for _ in range(steps):
                    training_step(model, x, opts[name])
                hooked = (time.perf_counter() - t0) / steps
                timer.remove()
                share = timer.seconds / steps / hooked
                if name not in bn or timer.seconds / steps < bn[name][0]:
                    bn[name] = (timer.seconds / steps, share)
        inputs = batch_norm_inputs(native, x)
        alone = {}
        for _ in range(max(1, rounds)):  # alternating, as the steps
            for name, model in models.items():
                time.sleep(pause)
                alone[name] = min(alone.get(name, float("inf")), batch_norm_alone(model, inputs, steps, 1))
        yield {"model": kind, "memory_format": fmt, "input_shape": list(shape),
               "bn_shapes": [list(t.shape) for t in inputs],
               "torch_bn_alone_s": alone["torch"], "fastbn_bn_alone_s": alone["fastbn"],
               "bn_alone_ratio": alone["torch"] / alone["fastbn"],
               "threads": torch.get_num_threads(), "output_rel_diff": output_diff,
               "torch_step_s": best["torch"], "fastbn_step_s": best["fastbn"],
               "step_ratio": best["torch"] / best["fastbn"],
               "torch_bn_s": bn["torch"][0], "fastbn_bn_s": bn["fastbn"][0],
               "torch_bn_share": bn["torch"][1], "fastbn_bn_share": bn["fastbn"][1],
               "bn_ratio": bn["torch"][0] / bn["fastbn"][0]}
    if progress:
        progress(len(cases), len(cases), "done")


def format_step_table(rows):
    header = (f"{'model':5} {'format':13} {'torch ms':>9} {'fastbn ms':>9} {'step x':>7} "
              f"{'BN torch ms':>11} {'BN fastbn ms':>12} {'BN x':>6} {'BN % torch':>10} {'BN % fastbn':>11} "
              f"{'alone x':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:5} {r['memory_format']:13} {r['torch_step_s'] * 1e3:9.2f} "
                     f"{r['fastbn_step_s'] * 1e3:9.2f} {r['step_ratio']:6.2f}x {r['torch_bn_s'] * 1e3:11.2f} "
                     f"{r['fastbn_bn_s'] * 1e3:12.2f} {r['bn_ratio']:5.2f}x {100 * r['torch_bn_share']:9.0f}% "
                     f"{100 * r['fastbn_bn_share']:10.0f}% {r['bn_alone_ratio']:6.2f}x")
    return "\n".join(lines)


STEP_LEGEND = (
    "step: forward + loss + backward + SGD update, mean per step over a batch of steps, best round; "
    "step x = torch step / fastbn step (> 1: fastbn.torch.convert makes the step faster).\n"
    "BN: time inside the batch-norm modules per step (forward and backward), from module hooks "
    "(forward pre-hook..hook, full backward pre-hook..hook) in separate, hooked steps; BN x = torch BN / fastbn BN; "
    "BN % = BN time / the hooked step's time; alone x = the same batch-norm modules' forward + backward "
    "on the step's batch-norm inputs with no other op between them, torch / fastbn (what BN x would be if "
    "the other layers left no trace in caches and thread pools).\n"
    "Both libraries run in this one process, alternating, with a pause between them; no OMP_WAIT_POLICY "
    "or spin setting is forced (the environment's thread settings are printed above).")

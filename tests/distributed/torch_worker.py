"""One rank of a torch.distributed (gloo, CPU) job: fastbn.torch.SyncBatchNorm against
single-process torch.nn.BatchNorm2d on the concatenated batch, and
convert_sync_batchnorm under DistributedDataParallel against single-process training.

Usage: ``python torch_worker.py RANK WORLD_SIZE PORT``; rank 0 prints
``FASTBN_RESULT {json}``.  Every case runs on the whole world, and the SyncBatchNorm
and error cases also on the process group of ranks 0 and 1 (``process_group=``), so one
job of 3 processes covers 2 and 3 processes (each process start costs seconds: torch's
import, and DDP's import of torch._dynamo).
"""

import copy
import datetime
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastbn.torch as ftorch
from error_cases import error_failures

rank, world, port = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(1)
# A collective that never completes fails after the timeout instead of hanging the test.
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=120))
failures, worst = [], {}
SPLITS = {2: [1, 4], 3: [2, 0, 3], 4: [1, 0, 2, 2]}
DDP_SPLITS = {2: [3, 5], 3: [2, 3, 3], 4: [2, 1, 3, 2]}


def note(key, value):
    worst[key] = max(worst.get(key, 0.0), float(value))


def scaled(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1.0)) if b.numel() else 0.0


def gather_cat(t, group):
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, t.detach(), group=group)
    return torch.cat(parts)


def sync_vs_single(dtype, group):
    """SyncBatchNorm(process_group=group) on the group's ranks (rank 0 among them)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    split = SPLITS[world]
    n, c = sum(split), 3
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    gy = torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    w, b = torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype)
    lo = sum(split[:rank])
    sbn = ftorch.SyncBatchNorm(c, momentum=0.3, process_group=group).to(dtype)
    with torch.no_grad():
        sbn.weight.copy_(w)
        sbn.bias.copy_(b)
    xl = x[lo:lo + split[rank]].clone().requires_grad_(True)
    y = sbn(xl)
    (y * gy[lo:lo + split[rank]]).sum().backward()
    ys, dxs = gather_cat(y, group), gather_cat(xl.grad, group)
    dw, db = sbn.weight.grad.clone(), sbn.bias.grad.clone()
    dist.all_reduce(dw, group=group)  # each rank holds its contribution; their sum is the batch's
    dist.all_reduce(db, group=group)
    states = [None] * world
    dist.all_gather_object(states, {k: v.clone() for k, v in sbn.state_dict().items()}, group=group)
    if rank != 0:
        return
    for s in states[1:]:
        for k in s:
            if not torch.equal(s[k], states[0][k]):
                failures.append(f"{dtype}, {world} ranks: {k} differs between ranks")
    ref = torch.nn.BatchNorm2d(c, momentum=0.3).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    (yr * gy).sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    name = f"{str(dtype).split('.')[1]}_{world}ranks"
    for key, got, want in (("y", ys, yr), ("dx", dxs, xr.grad), ("dweight", dw, ref.weight.grad),
                           ("dbias", db, ref.bias.grad), ("running_mean", states[0]["running_mean"], ref.running_mean),
                           ("running_var", states[0]["running_var"], ref.running_var)):
        e = scaled(got, want)
        note(f"{key}_{name}", e)
        if not e <= tol:
            failures.append(f"SyncBatchNorm {name} {key}: {e:.3g} > {tol:g}")
    if int(states[0]["num_batches_tracked"]) != 1:
        failures.append("num_batches_tracked")


def make_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 3)).double()


def ddp_vs_single(steps=3, lr=0.2):
    """The whole world trains under DDP (DDP's construction imports torch._dynamo: seconds)."""
    split = DDP_SPLITS[world]
    n = sum(split)
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(steps)]
    ts = [torch.randint(0, 3, (n,), generator=g) for _ in range(steps)]
    single = make_cnn()
    model = ftorch.convert_sync_batchnorm(copy.deepcopy(single))
    if not isinstance(model[1], ftorch.SyncBatchNorm):
        failures.append("convert_sync_batchnorm did not convert")
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    lo = sum(split[:rank])
    losses = []
    for x, t in zip(xs, ts):
        opt.zero_grad()
        out = ddp(x[lo:lo + split[rank]])
        # DDP averages gradients over the ranks: scale so the average is the full batch's mean loss.
        local = torch.nn.functional.cross_entropy(out, t[lo:lo + split[rank]], reduction="sum")
        (local * world / n).backward()
        opt.step()
        total = local.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / n)
    if rank != 0:
        return
    opt1 = torch.optim.SGD(single.parameters(), lr=lr)
    losses1 = []
    for x, t in zip(xs, ts):
        opt1.zero_grad()
        loss = torch.nn.functional.cross_entropy(single(x), t)
        loss.backward()
        opt1.step()
        losses1.append(float(loss.detach()))
    e = max(abs(a - b) / abs(b) for a, b in zip(losses, losses1))
    note("ddp_loss", e)
    state, state1 = model.state_dict(), single.state_dict()
    for k in state1:
        ek = scaled(state[k], state1[k])
        note("ddp_state", ek)
        if not ek <= 1e-10:
            failures.append(f"DDP {k}: {ek:.3g}")
    if not e <= 1e-12:
        failures.append(f"DDP losses {losses} vs {losses1}")


pair = dist.new_group([0, 1])  # collective: every rank creates it
for group in (dist.group.WORLD, pair) if world > 2 else (dist.group.WORLD,):
    if rank < dist.get_world_size(group):  # ranks 0 .. size-1 are the group's members
        failures.extend(error_failures(group, dist.get_rank(group), dist.get_world_size(group)))
        sync_vs_single(torch.float64, group)
        sync_vs_single(torch.float32, group)
ddp_vs_single()
all_failures = [None] * world
dist.all_gather_object(all_failures, failures)
if rank == 0:
    print("FASTBN_RESULT " + json.dumps({"failures": sum(all_failures, []), "worst": worst}), flush=True)
dist.destroy_process_group()

"""Run under ``mpiexec -n P``: fastbn.distributed on every split of a batch against
single-process fastbn on the concatenated batch, plus the mismatch errors.

Usage: ``mpiexec -n P python mpi_worker.py SPLITS_JSON [--errors] [--device]``; SPLITS_JSON is
a list of splits (each a list of per-rank batch sizes, for at most P ranks; a split of
p ranks runs on the world's first p ranks, with the error cases when asked).  ``--device`` runs the splits on
numba device arrays instead (with NUMBA_ENABLE_CUDASIM=1 in the environment: the CUDA
simulator), against single-process fastbn on the host.  Rank 0 prints one line
``FASTBN_RESULT {json}`` with the largest differences seen and the failures.
"""

import json
import sys

import numpy as np
from mpi4py import MPI

import fastbn
from error_cases import device_error_failures, error_failures
from fastbn import distributed

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures = []
worst = {}


def note(key, value):
    worst[key] = max(worst.get(key, 0.0), float(value))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))) if a.size else 0.0


def scaled(a, b):
    """max |a - b| / max |b|: elementwise error relative to the output's magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0)) if b.size else 0.0


def check(cond, what):
    if not cond:
        failures.append(f"rank {rank}: {what}")


def concat(parts, axis=0):
    return np.concatenate(parts, axis=axis)


def same_on_all_ranks(array, what):
    gathered = comm.allgather(np.asarray(array).tobytes())
    check(all(g == gathered[0] for g in gathered), f"{what} not bitwise identical on every rank")


def case(split, layout, dtype, ndim):
    c = 3
    n = sum(split)
    shape = (n, c) if ndim == 2 else ((n, c, 2, 3) if layout == "NCHW" else (n, 2, 3, c))
    rng = np.random.default_rng(n * 31 + ndim)  # every rank draws the same full batch
    x = (rng.standard_normal(shape) * 2.0 + 3.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight, bias = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm0, rv0 = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    lo = sum(split[:rank])
    xl, dyl = x[lo:lo + split[rank]], dy[lo:lo + split[rank]]
    tag = f"split={split} layout={layout} dtype={np.dtype(dtype).name} ndim={ndim}"
    dt = np.dtype(dtype).name

    # Training forward/backward.
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = distributed.batch_norm_forward(xl, weight, bias, running_mean=rm, running_var=rv,
                                                     comm=comm, layout=layout, momentum=0.3)
    dx, dw, db = distributed.batch_norm_backward(dyl, xl, mean, invstd, weight, comm=comm, layout=layout)
    check(y.shape == xl.shape and dx.shape == xl.shape, f"{tag}: y/dx shapes")
    for value, what in ((mean, "save_mean"), (invstd, "save_invstd"), (rm, "running_mean"), (rv, "running_var")):
        same_on_all_ranks(value, f"{tag}: {what}")
    ys, dxs = comm.gather(y, root=0), comm.gather(dx, root=0)
    dws, dbs = comm.gather(dw, root=0), comm.gather(db, root=0)
    smean, svar = distributed.batch_stats(xl, comm=comm, layout=layout)
    if rank == 0:
        rm1, rv1 = rm0.copy(), rv0.copy()
        y1, mean1, invstd1 = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm1, running_var=rv1,
                                                       layout=layout, momentum=0.3)
        dx1, dw1, db1 = fastbn.batch_norm_backward(dy, x, mean1, invstd1, weight, layout=layout)
        mean_s, var_s = fastbn.batch_stats(x, layout=layout)
        stats = max(rel(mean, mean1), rel(invstd, invstd1), rel(smean, mean_s), rel(svar, var_s))
        note("stats_rel", stats)
        check(stats < 1e-12, f"{tag}: statistics rel {stats:.3g}")
        running = max(rel(rm, rm1), rel(rv, rv1))
        note(f"running_rel_{dt}", running)
        check(running <= max(2 * np.finfo(dtype).eps, 1e-12), f"{tag}: running statistics rel {running:.3g}")
        ey, edx = scaled(concat(ys), y1), scaled(concat(dxs), dx1)
        note(f"y_{dt}", ey)
        note(f"dx_{dt}", edx)
        bound = 16 * np.finfo(dtype).eps
        check(ey <= bound and edx <= bound, f"{tag}: y {ey:.3g} dx {edx:.3g} > {bound:.3g}")
        # Parameter gradients: each rank's contribution; their sum is the whole batch's.
        sw = np.sum(np.array(dws, np.float64), axis=0)
        sb = np.sum(np.array(dbs, np.float64), axis=0)
        eg = max(scaled(sw, dw1), scaled(sb, db1))
        note(f"dweight_dbias_{dt}", eg)
        check(eg <= 64 * np.finfo(dtype).eps, f"{tag}: dweight/dbias sum {eg:.3g}")

    # Eval: running statistics, no communication (each rank alone).
    ye, me, ie = distributed.batch_norm_forward(xl, weight, bias, running_mean=rm0, running_var=rv0,
                                                comm=comm, training=False, layout=layout)
    dxe, _, _ = distributed.batch_norm_backward(dyl, xl, me, ie, weight, comm=comm, training=False, layout=layout)
    yes, dxes = comm.gather(ye, root=0), comm.gather(dxe, root=0)
    if rank == 0:
        y1, m1, i1 = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm0, running_var=rv0,
                                               training=False, layout=layout)
        dx1, _, _ = fastbn.batch_norm_backward(dy, x, m1, i1, weight, training=False, layout=layout)
        e = max(scaled(concat(yes), y1), scaled(concat(dxes), dx1))
        note(f"eval_{dt}", e)
        check(e == 0.0, f"{tag}: eval differs from local by {e:.3g}")


def layer_case(split):
    """fastbn.BatchNorm(comm=...) trained two steps vs the local layer on the whole batch."""
    c, n = 4, sum(split)
    rng = np.random.default_rng(5)
    lo = sum(split[:rank])
    synced, single = fastbn.BatchNorm(c, dtype=np.float64, comm=comm), fastbn.BatchNorm(c, dtype=np.float64)
    for step in range(2):
        x = rng.standard_normal((n, c, 3)) + step
        dy = rng.standard_normal((n, c, 3))
        y, dx = synced(x[lo:lo + split[rank]]), synced.backward(dy[lo:lo + split[rank]])
        gw = comm.allreduce(synced.grad_weight)  # contributions: their sum is the batch's
        ys, dxs = comm.gather(y, root=0), comm.gather(dx, root=0)
        if rank == 0:
            y1, dx1 = single(x), single.backward(dy)
            e = max(scaled(concat(ys), y1), scaled(concat(dxs), dx1), scaled(gw, single.grad_weight))
            note("layer", e)
            check(e < 1e-14, f"layer split={split} step {step}: {e:.3g}")
    same_on_all_ranks(synced.running_var, "layer running_var")
    if rank == 0:
        check(rel(synced.running_var, single.running_var) < 1e-14, "layer running_var")
    synced.eval()  # eval: local, no collective (rank 0 alone evaluates here)
    if rank == 0:
        check(scaled(synced(x), single.eval()(x)) < 1e-14, "layer eval")


def device_case(split, layout, dtype):
    """The CUDA backend's synchronized forward/backward (statistics on the device, the
    payload through the host), against single-process CPU fastbn on the whole batch."""
    from numba import cuda

    from fastbn.cuda import launch_config

    c, n = 3, sum(split)
    shape = (n, c, 2, 3) if layout == "NCHW" else (n, 2, 3, c)
    rng = np.random.default_rng(n * 7 + len(layout))
    x = (rng.standard_normal(shape) * 2.0 + 1e4).astype(dtype)  # a large offset
    dy = rng.standard_normal(shape).astype(dtype)
    weight, bias = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm0, rv0 = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    lo = sum(split[:rank])
    xl, dyl = x[lo:lo + split[rank]], dy[lo:lo + split[rank]]
    tag = f"device split={split} layout={layout} dtype={np.dtype(dtype).name}"
    d = cuda.to_device
    rm, rv = d(rm0), d(rv0)
    with launch_config.override(threads_per_block=32, max_blocks=4, values_per_block=1 << 20):
        y, mean, invstd = distributed.batch_norm_forward(d(xl), d(weight), d(bias), running_mean=rm,
                                                         running_var=rv, comm=comm, layout=layout)
        dx, dw, db = distributed.batch_norm_backward(d(dyl), d(xl), mean, invstd, d(weight), comm=comm,
                                                     layout=layout)
        smean, svar = distributed.batch_stats(d(xl), comm=comm, layout=layout)
        ye, _, _ = distributed.batch_norm_forward(d(xl), d(weight), d(bias), running_mean=d(rm0),
                                                  running_var=d(rv0), comm=comm, training=False, layout=layout)
    check(cuda.devicearray.is_cuda_ndarray(y) and cuda.devicearray.is_cuda_ndarray(dx)
          and cuda.devicearray.is_cuda_ndarray(mean), f"{tag}: results are not device arrays")
    check(y.shape == xl.shape and dx.shape == xl.shape and ye.shape == xl.shape, f"{tag}: y/dx shapes")
    y, mean, invstd, dx, dw, db, rm, rv, smean, svar, ye = (
        a.copy_to_host() for a in (y, mean, invstd, dx, dw, db, rm, rv, smean, svar, ye))
    for value, what in ((mean, "save_mean"), (invstd, "save_invstd"), (rm, "running_mean"), (rv, "running_var")):
        same_on_all_ranks(value, f"{tag}: {what}")
    ys, dxs, yes = comm.gather(y, root=0), comm.gather(dx, root=0), comm.gather(ye, root=0)
    dws, dbs = comm.gather(dw, root=0), comm.gather(db, root=0)
    if rank != 0:
        return
    rm1, rv1 = rm0.copy(), rv0.copy()
    y1, mean1, invstd1 = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm1, running_var=rv1, layout=layout)
    dx1, dw1, db1 = fastbn.batch_norm_backward(dy, x, mean1, invstd1, weight, layout=layout)
    mean_s, var_s = fastbn.batch_stats(x, layout=layout)
    ye1, _, _ = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm0, running_var=rv0, training=False,
                                          layout=layout)
    stats = max(rel(mean, mean1), rel(invstd, invstd1), rel(smean, mean_s), rel(svar, var_s))
    note("device_stats_rel", stats)
    check(stats < 1e-12, f"{tag}: statistics rel {stats:.3g}")
    running = max(rel(rm, rm1), rel(rv, rv1))
    note("device_running_rel", running)
    check(running <= max(2 * np.finfo(dtype).eps, 1e-12), f"{tag}: running statistics rel {running:.3g}")
    # The device's statistics differ from the CPU's in summation order (stats_rel above);
    # with a 1e4 offset an error r in the mean moves y by r * |mean| * invstd, so the bound
    # is the dtype's rounding plus the measured statistics error, propagated.
    propagated = stats * (np.max(np.abs(mean1) * invstd1) + np.max(np.abs(y1)) + 1)
    bound = 16 * np.finfo(dtype).eps + 8 * propagated
    ey, edx, eeval = scaled(concat(ys), y1), scaled(concat(dxs), dx1), scaled(concat(yes), ye1)
    eg = max(scaled(np.sum(np.array(dws, np.float64), axis=0), dw1), scaled(np.sum(np.array(dbs, np.float64), axis=0), db1))
    for key, e, b in (("y", ey, bound), ("dx", edx, bound), ("eval", eeval, bound), ("dweight_dbias", eg, 64 * bound)):
        note(f"device_{key}", e)
        check(e <= b, f"{tag}: {key} {e:.3g} > {b:.3g}")


def use(communicator):
    """Run the cases that follow on ``communicator`` (the worker's cases use these globals)."""
    global comm, rank, size
    comm, rank, size = communicator, communicator.Get_rank(), communicator.Get_size()


def main():
    """Splits of P ranks run on the first P ranks of the world (one launch serves every P:
    a process start costs more than a split's cases), largest P first."""
    world = MPI.COMM_WORLD
    splits = json.loads(sys.argv[1])
    for p in sorted({len(split) for split in splits}, reverse=True):
        sub = world.Split(0 if world.Get_rank() < p else MPI.UNDEFINED, world.Get_rank())
        if sub == MPI.COMM_NULL:
            continue
        use(sub)
        for split in (s for s in splits if len(s) == p):
            if "--device" in sys.argv:
                device_case(split, "NCHW", np.float64)
                device_case(split, "NHWC", np.float32)
                continue
            for layout in ("NCHW", "NHWC"):
                for dtype in (np.float32, np.float64):
                    case(split, layout, dtype, 4)
            case(split, "NCHW", np.float64, 2)
            layer_case(split)
        if "--device" in sys.argv:
            failures.extend(device_error_failures(comm, rank, size))
        if "--errors" in sys.argv:
            failures.extend(error_failures(comm, rank, size))
        sub.Free()
    use(world)
    all_failures = comm.gather(failures, root=0)
    if rank == 0:
        print("FASTBN_RESULT " + json.dumps({"failures": sum(all_failures, []), "worst": worst}), flush=True)


if __name__ == "__main__":
    main()

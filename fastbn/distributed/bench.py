"""Cost of synchronization: synchronized against local batch norm, per pass, over MPI.

Run under MPI (``pip install "fastbn[mpi]"``)::

    mpiexec -n 2 python -m fastbn.distributed.bench [--shape 16,64,16,16] [--repeat 30]
    mpiexec -n 4 python -m fastbn.distributed.bench

Every rank normalizes a local batch of ``--shape`` (NCHW, float32).  Rank 0 prints the
median time of a forward and of a backward pass, local (:func:`fastbn.batch_norm_forward`
/ ``_backward``) and synchronized (:mod:`fastbn.distributed`), the difference (the cost
of synchronization: the allgather and the merge), and the bytes each rank sends per
pass (its pickled payload: header plus 3 float64 values per channel; an allgather also
delivers every other rank's payload to it).
"""

import argparse
import pickle
import time

import numpy as np


def _median_time(comm, fn, repeat):
    times = []
    for _ in range(repeat):
        comm.Barrier()  # every rank starts together: the collective measures no skew
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    from mpi4py import MPI

    import fastbn
    from fastbn import distributed
    from fastbn.distributed import _header

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="16,64,16,16", help="local batch shape, NCHW (default 16,64,16,16)")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(comm.Get_rank())
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

    _, mean, invstd = fastbn.batch_norm_forward(x, w, b)
    local_f = lambda: fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv)  # noqa: E731
    sync_f = lambda: distributed.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, comm=comm)  # noqa: E731
    local_b = lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, w)  # noqa: E731
    sync_b = lambda: distributed.batch_norm_backward(dy, x, mean, invstd, w, comm=comm)  # noqa: E731
    payload = (_header(x, "NCHW"), tuple(np.zeros(c) for _ in range(3)))
    gather_only = lambda: comm.allgather(payload)  # noqa: E731
    for fn in (local_f, sync_f, local_b, sync_b, gather_only):  # compile and warm up
        fn()
    t = {name: _median_time(comm, fn, args.repeat) for name, fn in
         (("local_f", local_f), ("sync_f", sync_f), ("local_b", local_b), ("sync_b", sync_b),
          ("gather", gather_only))}
    worst = comm.reduce(t, op=lambda a, b_: {k: max(a[k], b_[k]) for k in a}, root=0)
    if comm.Get_rank() != 0:
        return
    sent = len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    p = comm.Get_size()
    print(f"{p} MPI ranks, local batch {shape} float32 NCHW, C={c}; median of {args.repeat}, "
          f"slowest rank, ms")
    print(f"{'pass':9s} {'local':>8s} {'synced':>8s} {'sync cost':>10s} {'bytes sent/rank':>16s}")
    for name, lo, sy in (("forward", "local_f", "sync_f"), ("backward", "local_b", "sync_b")):
        print(f"{name:9s} {1e3 * worst[lo]:8.3f} {1e3 * worst[sy]:8.3f} "
              f"{1e3 * (worst[sy] - worst[lo]):10.3f} {sent:16d}")
    print(f"allgather of one payload alone: {1e3 * worst['gather']:.3f} ms; each rank receives "
          f"{p} x {sent} bytes per pass (3 float64 per channel = {24 * c} bytes of data)")


if __name__ == "__main__":
    main()

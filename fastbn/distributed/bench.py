"""Cost of synchronization: synchronized against local batch norm, per pass, over MPI or
torch.distributed (gloo).

Run under MPI (``pip install "fastbn[mpi]"``) or torchrun::

    mpiexec -n 2 python -m fastbn.distributed.bench [--shape 16,64,16,16] [--repeat 30]
    mpiexec -n 4 python -m fastbn.distributed.bench
    torchrun --standalone --nproc-per-node 2 -m fastbn.distributed.bench --engine gloo

Every rank normalizes a local batch of ``--shape`` (NCHW, float32).  Rank 0 prints the
median time of a forward and of a backward pass (the slowest rank's), local
(:func:`fastbn.batch_norm_forward` / ``_backward``) and synchronized
(:mod:`fastbn.distributed`), the difference (the cost of synchronization: the
allgather and the merge), and the bytes each rank sends per pass: its fixed-size
buffers (:mod:`fastbn.distributed._protocol`: a header and ``2 C`` float64, one
allgather up to 64 channels); an allgather also delivers every other rank's to it.
"""

import argparse
import time

import numpy as np

class _MPI:
    name = "mpi"

    def __init__(self):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def barrier(self):
        self.comm.Barrier()

    def gather_objects(self, obj):
        return self.comm.allgather(obj)

    def close(self):
        pass


class _Gloo:
    name = "gloo"

    def __init__(self):
        import torch.distributed as dist

        dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT
        self.dist = dist
        self.comm = dist.group.WORLD
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def barrier(self):
        self.dist.barrier()

    def gather_objects(self, obj):
        gathered = [None] * self.size
        self.dist.all_gather_object(gathered, obj)
        return gathered

    def close(self):
        self.dist.destroy_process_group()


def _median_time(engine, fn, repeat):
    times = []
    for _ in range(repeat):
        engine.barrier()  # every rank starts together: the collective measures no skew
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    import fastbn
    from fastbn import distributed
    from fastbn.distributed import _protocol
    from fastbn.distributed._engines import engine_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="16,64,16,16", help="local batch shape, NCHW (default 16,64,16,16)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--engine", choices=("mpi", "gloo"), default="mpi",
                        help="mpi (under mpiexec) or gloo (torch.distributed, under torchrun)")
    args = parser.parse_args(argv)
    engine = _MPI() if args.engine == "mpi" else _Gloo()
    comm = engine.comm
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(engine.rank)
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
    own = (c, x.dtype, "NCHW", x.size // c, np.zeros(c), np.zeros(c))
    gather_only = lambda: _protocol.exchange(engine_for(comm), "bench", own)  # noqa: E731
    for fn in (local_f, sync_f, local_b, sync_b, gather_only):  # compile and warm up
        fn()
    t = {name: _median_time(engine, fn, args.repeat) for name, fn in
         (("local_f", local_f), ("sync_f", sync_f), ("local_b", local_b), ("sync_b", sync_b),
          ("gather", gather_only))}
    times = engine.gather_objects(t)
    engine.close()
    if engine.rank != 0:
        return
    worst = {k: max(r[k] for r in times) for k in t}
    sent = _protocol.payload_bytes(c)
    print(f"{engine.size} ranks ({engine.name}), local batch {shape} float32 NCHW, C={c}; median of "
          f"{args.repeat}, slowest rank, ms")
    print(f"{'pass':9s} {'local':>8s} {'synced':>8s} {'sync cost':>10s} {'bytes sent/rank':>16s}")
    for name, lo, sy in (("forward", "local_f", "sync_f"), ("backward", "local_b", "sync_b")):
        print(f"{name:9s} {1e3 * worst[lo]:8.3f} {1e3 * worst[sy]:8.3f} "
              f"{1e3 * (worst[sy] - worst[lo]):10.3f} {sent:16d}")
    print(f"the exchange alone (allgather and checks): {1e3 * worst['gather']:.3f} ms; each rank receives "
          f"{engine.size} x {sent} bytes per pass ({16 * c} bytes of float64 data each)")


if __name__ == "__main__":
    main()

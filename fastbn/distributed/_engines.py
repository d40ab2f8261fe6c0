"""The collectives fastbn's synchronized batch norm needs, on real communication engines.

An engine wraps a caller's communicator and offers ``rank``, ``size`` and
``allgather(obj)`` (every rank gets the list of every rank's object, indexed by rank).
The engine is picked from the communicator's type; the engines' libraries are never
imported here: a communicator of their type can only exist once they are imported, so
looking them up in ``sys.modules`` decides without importing mpi4py or torch.
"""

import sys


class MPIEngine:
    """``mpi4py.MPI.Comm`` (intra-communicator): pickled-object allgather on the host
    (device data sends its few per-channel values through host memory).

    The object form carries payloads of different lengths (ranks that disagree on the
    channel count), so a mismatch is detected from the gathered headers instead of
    truncating or blocking a fixed-size buffer collective.
    """

    name = "mpi"

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, obj):
        # One collective call; mpi4py runs it as a length exchange plus an Allgatherv of
        # the pickles (a few hundred bytes plus 24 per channel).
        return self.comm.allgather(obj)


class TorchEngine:
    """``torch.distributed.ProcessGroup``: ``all_gather_object`` on that group.

    gloo exchanges the pickled payload on the host; NCCL (CUDA tensors) as a CUDA byte
    tensor on ``torch.cuda.current_device()`` (torch moves it there; the caller sets
    that device per rank, as torch requires for NCCL).  Not run on GPU hardware here.
    """

    name = "torch.distributed"

    def __init__(self, group):
        import torch.distributed as dist  # already imported: the group is one of its objects

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def allgather(self, obj):
        # One collective call; torch runs it as a size all_gather plus a data all_gather.
        gathered = [None] * self.size
        self.dist.all_gather_object(gathered, obj, group=self.group)
        return gathered


def engine_for(comm):
    """The engine for ``comm``, or TypeError naming what is accepted."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(comm, mpi.Comm):
        return MPIEngine(comm)
    dist = sys.modules.get("torch.distributed")
    process_group = getattr(dist, "ProcessGroup", None) if dist is not None else None
    if process_group is not None and isinstance(comm, process_group):
        return TorchEngine(comm)
    raise TypeError(f"comm: expected an mpi4py.MPI.Comm or a torch.distributed.ProcessGroup, "
                    f"got {type(comm).__name__}")

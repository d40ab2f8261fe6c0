"""The collective fastbn's synchronized batch norm needs, on real communication engines.

An engine wraps a caller's communicator and offers ``rank``, ``size`` and
``allgather_bytes(buffer)``: every rank passes a 1-D uint8 array of the same size and
gets the (size, nbytes) array of every rank's, indexed by rank (what travels is decided
in :mod:`fastbn.distributed._protocol`).  The engine is picked from the communicator's
type; the engines' libraries are never imported here: a communicator of their type can
only exist once they are imported, so looking them up in ``sys.modules`` decides
without importing mpi4py or torch.
"""

import sys

import numpy as np


class MPIEngine:
    """``mpi4py.MPI.Comm`` (intra-communicator): ``Allgather`` of host byte buffers
    (device data sends its few per-channel values through host memory)."""

    name = "mpi"

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather_bytes(self, buffer):
        gathered = np.empty((self.size, buffer.size), np.uint8)
        self.comm.Allgather(buffer, gathered)
        return gathered


class TorchEngine:
    """``torch.distributed.ProcessGroup``: ``all_gather`` of uint8 tensors on that group.

    gloo gathers host tensors.  NCCL gathers CUDA tensors only, so there the buffer goes
    to ``torch.cuda.current_device()`` and back (the caller sets each rank's device, as
    torch requires for NCCL); that branch has not run on GPU hardware here.
    """

    name = "torch.distributed"

    def __init__(self, group):
        import torch  # already imported: the group is one of torch.distributed's objects
        import torch.distributed as dist

        self.torch, self.dist, self.group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend(group) == "nccl" else None)

    def allgather_bytes(self, buffer):
        tensor = self.torch.from_numpy(buffer)
        if self.device is not None:
            tensor = tensor.to(self.device)
        gathered = [self.torch.empty_like(tensor) for _ in range(self.size)]
        self.dist.all_gather(gathered, tensor, group=self.group)
        return self.torch.stack(gathered).cpu().numpy()


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

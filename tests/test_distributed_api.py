"""fastbn.distributed without a communicator: import isolation and argument errors."""

import subprocess
import sys

import numpy as np
import pytest

from fastbn import distributed


def test_import_fastbn_imports_neither_mpi4py_nor_torch():
    code = ("import sys, fastbn, fastbn.distributed; "
            "bad = [m for m in ('mpi4py', 'torch') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("comm", [None, 0, object()])
def test_comm_must_be_a_communicator(comm):
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="comm: expected an mpi4py.MPI.Comm or a torch.distributed.ProcessGroup"):
        distributed.batch_norm_forward(x, comm=comm)
    with pytest.raises(TypeError, match="comm: expected"):
        distributed.batch_stats(x, comm=comm)
    with pytest.raises(TypeError, match="comm: expected"):
        distributed.batch_norm_backward(x, x, np.zeros(3), np.ones(3), comm=comm)


def test_comm_is_keyword_only():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError):
        distributed.batch_stats(x, None)

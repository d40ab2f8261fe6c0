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


class _Gathered:
    """What agree() needs of an engine: its name and size (the payloads come as a list)."""

    name, size = "test", 3


def test_payload_round_trips_bitwise_and_names_other_protocols():
    from fastbn.distributed import _protocol

    rng = np.random.default_rng(0)
    c = 5
    sent = [(float(n), rng.standard_normal(c) * 1e4, rng.random(c) * 1e-300) for n in (0, 3, 7)]
    gathered = [_protocol.pack(c, np.float32, "NHWC", *s) for s in sent]
    parts = _protocol.agree(_Gathered, gathered, None, "op")
    for (count, first, second), (n, a, b) in zip(parts, sent):
        assert np.all(count == n) and count.shape == (c,)
        assert first.tobytes() == a.tobytes() and second.tobytes() == b.tobytes()
        assert first.flags.writeable  # a merged mean becomes the caller's save_mean
    old = {"protocol": 1, "ok": True, "channels": c}  # an older fastbn's payload
    with pytest.raises(ValueError, match=r"op: rank\(s\) \[1\] of 3 \(test\).*rank 1: protocol mismatch"):
        _protocol.agree(_Gathered, [gathered[0], old, gathered[2]], None, "op")
    failed = _protocol.failure(TypeError("weight: expected float32, got float64"))
    with pytest.raises(ValueError, match=r"rank\(s\) \[2\].*rank 2: TypeError: weight: expected float32"):
        _protocol.agree(_Gathered, [gathered[0], gathered[1], failed], None, "op")
    other = _protocol.pack(c + 1, np.float32, "NHWC", 1.0, np.zeros(c + 1), np.zeros(c + 1))
    with pytest.raises(ValueError, match="op: expected every rank to pass the same channels"):
        _protocol.agree(_Gathered, [gathered[0], other, gathered[2]], None, "op")

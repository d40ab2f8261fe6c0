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


class _Recorded:
    """An engine for one process: ``allgather_bytes`` returns this rank's buffer at
    ``rank`` among buffers recorded from other ranks (to test the protocol's decisions)."""

    name = "test"

    def __init__(self, rank, others):
        self.rank, self.others, self.size, self.calls = rank, others, len(others) + 1, 0

    def allgather_bytes(self, buffer):
        rows = [o[self.calls] for o in self.others]
        rows.insert(self.rank, buffer)
        self.calls += 1
        return np.stack(rows)


def _buffers(own, error=None):
    """The buffers a rank sends for ``own`` (recorded through a one-rank engine)."""
    from fastbn.distributed import _protocol

    sent = []

    class Recorder:
        name, size = "record", 1

        def allgather_bytes(self, buffer):
            sent.append(buffer.copy())
            return buffer[None, :]

    try:
        _protocol.exchange(Recorder(), "op", own, error)
    except (TypeError, ValueError):
        pass
    return sent


@pytest.mark.parametrize("channels", [5, 70])
def test_payload_round_trips_bitwise_in_one_or_two_fixed_size_collectives(channels):
    from fastbn.distributed import _protocol

    rng = np.random.default_rng(0)
    sent = [(channels, np.float32, "NHWC", float(n), rng.standard_normal(channels) * 1e4,
             rng.random(channels) * 1e-300) for n in (0, 3, 7)]
    sent[1][4][0] = np.nan
    engine = _Recorded(1, [_buffers(sent[0]), _buffers(sent[2])])
    parts = _protocol.exchange(engine, "op", sent[1])
    assert engine.calls == (1 if channels <= _protocol.FIRST_CHANNELS else 2)
    for (count, first, second), (_, _, _, n, a, b) in zip(parts, sent):
        assert np.all(count == n) and count.shape == (channels,)
        assert first.tobytes() == a.tobytes() and second.tobytes() == b.tobytes()
        assert first.flags.writeable  # a merged mean becomes the caller's save_mean
    assert _protocol.payload_bytes(channels) == sum(b.size for b in _buffers(sent[0]))


def test_payload_errors_name_the_failed_rank_and_the_disagreement():
    from fastbn.distributed import _protocol

    good = (70, np.float32, "NCHW", 2.0, np.zeros(70), np.ones(70))
    failed = _buffers(None, TypeError("weight: expected float32, got float64"))
    with pytest.raises(ValueError, match=r"op: rank\(s\) \[0\] of 2 \(test\).*rank 0: TypeError: weight: "
                                         r"expected float32, got float64"):
        _protocol.exchange(_Recorded(1, [failed]), "op", good)
    older = [np.zeros_like(failed[0])]  # another release's buffer: no protocol mark
    with pytest.raises(ValueError, match=r"rank 1: protocol mismatch"):
        _protocol.exchange(_Recorded(0, [older]), "op", good)
    other = _buffers((70, np.float64, "NCHW", 2.0, np.zeros(70), np.ones(70)))
    engine = _Recorded(0, [other])
    with pytest.raises(ValueError, match="op: expected every rank to pass the same dtype .*rank 1: float64"):
        _protocol.exchange(engine, "op", good)
    assert engine.calls == 1  # no second collective after a disagreement

"""The mismatch and invalid-rank errors of fastbn.distributed, on any communicator: run by
every rank of the MPI and the torch.distributed workers (the same cases on both engines)."""

import numpy as np

from fastbn import distributed


def _expecter(rank, failures):
    def expect_error(label, call, own_type=ValueError, fragment=""):
        try:
            call()
        except (TypeError, ValueError) as e:
            if not (isinstance(e, own_type) and fragment in str(e)):
                failures.append(f"rank {rank}: {label}: got {type(e).__name__}: {e} "
                                f"(expected {own_type.__name__} with {fragment!r})")
        else:
            failures.append(f"rank {rank}: {label}: no error raised")
    return expect_error


def error_failures(comm, rank, size):
    """Run the error cases collectively; returns this rank's failure messages (empty: all passed)."""
    failures = []
    expect_error = _expecter(rank, failures)

    x = np.ones((2, 3), np.float32) + np.arange(3, dtype=np.float32)
    last = size - 1
    if size > 1:
        xc = np.ones((2, 4 if rank == 1 else 3), np.float32)
        expect_error("channels", lambda: distributed.batch_norm_forward(xc, comm=comm), fragment="same channels")
        xd = x.astype(np.float64) if rank == last else x
        expect_error("dtype", lambda: distributed.batch_norm_forward(xd, comm=comm), fragment="same dtype")
        x4 = np.ones((2, 3, 3, 3), np.float32)
        lay = "NHWC" if rank == last else "NCHW"
        expect_error("layout", lambda: distributed.batch_stats(x4, comm=comm, layout=lay), fragment="same layout")
        # An invalid rank joins the collective flagged invalid and raises its own error.
        w = np.ones(5 if rank == last else 3, np.float32)
        expect_error("invalid weight", lambda: distributed.batch_norm_forward(x, w, comm=comm),
                     fragment="weight: expected shape (3,)" if rank == last else f"rank(s) [{last}]")
        dyb = np.ones((2, 3), np.float64 if rank == last else np.float32)
        expect_error("invalid backward", lambda: distributed.batch_norm_backward(
            dyb, x, np.zeros(3), np.ones(3), comm=comm),
            own_type=TypeError if rank == last else ValueError,
            fragment="dy: expected the dtype of x" if rank == last else f"rank(s) [{last}]")
        # Beyond the first buffer's 64 channels: disagreeing ranks stop after the first
        # collective (the second's sizes would differ).
        xw = np.ones((2, 71 if rank == 0 else 70), np.float32)
        expect_error("wide channels", lambda: distributed.batch_stats(xw, comm=comm), fragment="same channels")
    # Too few values in the whole batch: every rank raises the same error.
    xs = np.ones((1 if rank == 0 else 0, 3), np.float32)
    expect_error("global count", lambda: distributed.batch_norm_forward(xs, comm=comm),
                 fragment="Expected more than 1 value per channel")
    # Still in step after the errors: more collective calls work, with 70 channels
    # (two collectives) too; rank r holds r + 1 rows of channel means c + r.
    m, v = distributed.batch_stats(x, comm=comm)
    if not (np.allclose(m, [1, 2, 3]) and np.allclose(v, 0)):
        failures.append(f"rank {rank}: collective after the errors gave {m}, {v}")
    xw = np.broadcast_to(np.arange(70.0) + rank, (rank + 1, 70))
    m, v = distributed.batch_stats(xw, comm=comm)
    weights = np.arange(1, size + 1)
    mean = np.arange(70.0) + np.sum(weights * np.arange(size)) / weights.sum()
    var = np.sum(weights * (np.arange(size) - np.sum(weights * np.arange(size)) / weights.sum()) ** 2) / weights.sum()
    if not (np.allclose(m, mean, rtol=1e-14) and np.allclose(v, var, rtol=1e-12, atol=1e-14)):
        failures.append(f"rank {rank}: 70 channels gave {m[:3]}, {v[:3]}, expected {mean[:3]}, {var}")
    return failures


def device_error_failures(comm, rank, size):
    """With device arrays: a rank mixing host and device arrays raises its own TypeError;
    the others name it.  Returns this rank's failure messages."""
    from numba import cuda

    failures = []
    expect_error = _expecter(rank, failures)
    x = cuda.to_device(np.ones((2, 3), np.float32))
    last = size - 1
    w = np.ones(3, np.float32) if rank == last else cuda.to_device(np.ones(3, np.float32))
    expect_error("device/host weight", lambda: distributed.batch_norm_forward(x, w, comm=comm),
                 own_type=TypeError if rank == last else ValueError,
                 fragment="weight: expected a CUDA device array" if rank == last else f"rank(s) [{last}]")
    return failures

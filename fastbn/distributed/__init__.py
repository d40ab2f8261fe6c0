"""Synchronized batch norm: statistics over the union of every rank's batch.

Data-parallel training splits a batch over processes; these functions normalize each
rank's part with the statistics of the whole batch::

    batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                       comm, training=True, momentum=0.1, eps=1e-5, layout="NCHW", out=None)
        -> (y, save_mean, save_invstd)
    batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *,
                        comm, training=True, layout="NCHW", out=None) -> (dx, dweight, dbias)
    batch_stats(x, *, comm, layout="NCHW") -> (mean, var)

``comm`` is an ``mpi4py.MPI.Comm`` or a ``torch.distributed.ProcessGroup``; the engine
is picked from its type (neither library is imported by fastbn itself).  Arguments and
results are those of :func:`fastbn.batch_norm_forward` / :func:`fastbn.batch_norm_backward`
/ :func:`fastbn.batch_stats` (NumPy or CUDA device arrays), with these differences:

- Training (``training=True``) is collective: every rank of ``comm`` must call the same
  function.  Forward: each rank's per-channel :class:`~fastbn.Moments` (count, mean,
  M2; one count serves every channel) travel in one allgather (a second one beyond 64
  channels) with a small header (channel count, dtype, layout, whether this rank's
  arguments were valid), and every rank merges them with Chan's formula **in rank
  order**, so the statistics, ``save_mean``/``save_invstd`` and the
  running statistics are bitwise identical on every rank whatever the message order.
  The running variance is unbiased with the global count.  Backward: the same exchange of
  the per-channel ``count``, ``sum(dy)`` and ``sum(dy * (x - mean))``, added in rank
  order; ``dx`` uses the global count.
- ``dweight`` and ``dbias`` are **this rank's contributions** (computed from its own
  ``dy`` and ``x``), as in PyTorch's ``SyncBatchNorm``: data-parallel gradient
  averaging (DDP's allreduce) sums them with the other parameters' gradients.  Their
  sum over the ranks is the gradient of the whole batch.
- A rank may hold zero samples (``x.shape[0] == 0``): it contributes count 0, still
  takes part in the collectives and gets an empty ``y``/``dx`` (and zero
  ``dweight``/``dbias``).  The "more than one value per channel" rule applies to the
  whole batch, not to each rank.
- Eval (``training=False``) does not communicate: each rank normalizes with its
  running statistics, as :func:`fastbn.batch_norm_forward` does.
- Errors.  Each rank checks its own arguments first.  A rank whose arguments are
  invalid still joins the collective, flagged invalid, and raises its own error; the
  other ranks raise ValueError naming it.  Ranks that disagree on the channel count,
  dtype or layout all raise ValueError.  No rank hangs and no rank computes with
  wrong statistics.

Exactness: for any split of a batch over the ranks, the statistics equal those of
single-process fastbn on the concatenated batch to float64 rounding (the merge adds
~5 roundoffs per rank, see :mod:`fastbn.stats`), and ``y``/``dx`` follow to the dtype's
rounding.

Where the data lives: NumPy arrays run the CPU kernels; CUDA device arrays (numba
device arrays, PyTorch CUDA tensors, CuPy arrays) compute their moments and sums on the
device with the CUDA stages, only the (C,) payload travels through the host for the
collective (:mod:`fastbn.distributed._device`; an NCCL process group gathers it as a
CUDA tensor on ``torch.cuda.current_device()``, which the caller sets as torch
requires), and the coefficients and the apply pass run on the device;
results come back where ``x`` lives.  The merge runs on the host, in rank order, so
every rank gets the same bits.  Tested on Numba's CUDA simulator under MPI; the NCCL
branch has not been run on GPU hardware here.

Payload: per rank and call, a header and ``2 C`` float64 values in fixed-size byte
buffers: one allgather up to 64 channels, two beyond, never a size exchange
(:mod:`fastbn.distributed._protocol`).
"""

import numpy as np

from .. import _checks
from .._api import _param_dtype, batch_norm_backward as _local_backward, batch_norm_forward as _local_forward
from .._dispatch import select_backend
from ..stats import BackwardSums, Moments
from . import _device, _protocol
from ._engines import engine_for

__all__ = ["batch_norm_forward", "batch_norm_backward", "batch_stats"]


def _is_empty_batch(x):
    return hasattr(x, "shape") and 2 <= len(x.shape) <= 5 and x.shape[0] == 0


def _stand_in(x, layout):
    """``x`` as the single-process checks see it: an empty batch (``x.shape[0] == 0``)
    or one with fewer than two values per channel is legal here (the whole batch counts),
    so those checks run on a zero-cost broadcast host array of x's dtype with a batch of 2
    (they look only at shape and dtype, so this serves device arrays too)."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (np.generic, np.ma.MaskedArray))
            and 2 <= len(x.shape) <= 5 and x.shape[0] < 2 and 0 not in tuple(x.shape)[1:]):
        return x
    try:
        dtype = _checks.dtype_of(x)
    except TypeError:
        return x  # the checks name the dtype
    return np.broadcast_to(np.zeros((), dtype), (2, *tuple(x.shape)[1:]))


def _channels(x, layout):
    return int(x.shape[_checks.channel_axis(len(x.shape), layout)])


def _exchange(engine, compute, what):
    """Run ``compute`` (local checks and statistics; returns ``(own, state)``, ``own`` as
    :func:`fastbn.distributed._protocol.exchange` takes it), then the collective, also
    when ``compute`` raised; returns every rank's (count, first, second) in rank order,
    and ``state``."""
    error, own, state = None, None, None
    try:
        own, state = compute()
    except Exception as e:  # noqa: BLE001 - whatever failed here, the other ranks must not block
        error = e
    return _protocol.exchange(engine, what, own, error), state


def _gather_moments(engine, x, layout, arrays, local_check, what):
    """Local checks, then the exchange of (header, count, mean, M2) (one allgather up to
    64 channels); returns (merged host Moments in rank order, backend, geometry, dense x)
    on every rank."""
    def compute():
        backend = select_backend(arrays)
        local_check(backend)
        b, c, xd = backend.module, _channels(x, layout), x
        if x.shape[0] == 0:
            geometry, (count, mean, m2) = None, Moments.empty(c)
        else:
            geometry = b.geometry(x, layout)
            xd = b.as_dense(x, geometry)
            count, mean, m2 = _device.to_host(b.moments(xd, geometry), backend, x)
        return (c, _checks.dtype_of(x), layout, count[0], mean, m2), (backend, geometry, xd)

    parts, (backend, geometry, xd) = _exchange(engine, compute, what)
    moments = [Moments(*p) for p in parts]
    return moments[0].merge(*moments[1:]), backend, geometry, xd


def _check_global_count(merged, engine, minimum, shape_note):
    total = float(merged.count[0])
    if total < minimum:
        raise ValueError(f"Expected more than {minimum - 1} value per channel when training, got "
                         f"{total:g} value(s) per channel over the {engine.size} ranks ({shape_note})")


def batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None, comm,
                       training=True, momentum=0.1, eps=1e-5, layout="NCHW", out=None):
    """Synchronized :func:`fastbn.batch_norm_forward` over the ranks of ``comm`` (see the module).

    Returns ``(y, save_mean, save_invstd)``: ``y`` for this rank's ``x`` (empty when
    ``x.shape[0] == 0``), the global batch's float64 mean and 1/sqrt(var + eps) (the same
    bits on every rank) in training, the running ones in eval; all where ``x`` lives.
    """
    engine = engine_for(comm)
    arrays = {"x": x, "weight": weight, "bias": bias, "running_mean": running_mean,
              "running_var": running_var, "out": out}
    if not (isinstance(training, (bool, np.bool_)) and training):
        return _eval_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, layout, out,
                             arrays)

    def local_check(backend):
        _checks.check_forward_args(_stand_in(x, layout), weight, bias, running_mean, running_var, True,
                                   momentum, eps, layout, backend.storage_dtypes, _param_dtype(x))
        _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))

    merged, backend, geometry, xd = _gather_moments(engine, x, layout, arrays, local_check, "batch_norm_forward")
    _check_global_count(merged, engine, 2, "training needs more than one value per channel in the whole batch")
    b = backend.module
    dtype = _checks.dtype_of(x)
    count, mean, m2 = _device.to_backend(merged, backend, x)
    coefficients = b.forward_coefficients(
        count, mean, m2, True, weight, bias, float(eps), running_mean, running_var,
        float(momentum), running_mean is not None, dtype)
    y = _device.empty_like(x, out, dtype) if x.shape[0] == 0 else b.apply(xd, coefficients, geometry, out)
    return y, coefficients.mean, coefficients.invstd


def _eval_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, layout, out, arrays):
    """Eval: no communication; an empty local batch gets an empty ``y``."""
    if not _is_empty_batch(x):
        return _local_forward(x, weight, bias, running_mean=running_mean, running_var=running_var,
                              training=training, momentum=momentum, eps=eps, layout=layout, out=out)
    # The local call's checks (and messages), on a stand-in batch of x's shape.
    backend = select_backend(arrays)
    _checks.check_forward_args(_stand_in(x, layout), weight, bias, running_mean, running_var, training,
                               momentum, eps, layout, backend.storage_dtypes, _param_dtype(x))
    dtype = _checks.dtype_of(x)
    _checks.check_out(out, "out", x.shape, dtype)
    coefficients = backend.module.forward_coefficients(
        None, running_mean, running_var, False, weight, bias, float(eps), None, None, 0.0, False, dtype)
    return _device.empty_like(x, out, dtype), coefficients.mean, coefficients.invstd


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, comm, training=True,
                        layout="NCHW", out=None):
    """Synchronized :func:`fastbn.batch_norm_backward` over the ranks of ``comm`` (see the module).

    Returns ``(dx, dweight, dbias)``: ``dx`` for this rank's part (empty when
    ``x.shape[0] == 0``) through the whole batch's statistics; ``dweight`` and ``dbias``
    this rank's contributions (sum them over the ranks for the whole batch's).
    """
    engine = engine_for(comm)
    arrays = {"dy": dy, "x": x, "save_mean": save_mean, "save_invstd": save_invstd, "weight": weight, "out": out}
    if not (isinstance(training, (bool, np.bool_)) and training):
        return _eval_backward(dy, x, save_mean, save_invstd, weight, training, layout, out, arrays)

    def compute():
        backend = select_backend(arrays)
        _checks.check_backward_args(_stand_in(dy, layout), _stand_in(x, layout), save_mean, save_invstd,
                                    weight, True, layout, backend.storage_dtypes, _param_dtype(x),
                                    backend.statistics_dtypes)
        _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
        b, c = backend.module, _channels(x, layout)
        if x.shape[0] == 0:
            geometry, xd, dyd = None, x, dy
            sums = _device.to_backend(BackwardSums(np.zeros(c), np.zeros(c), np.zeros(c)), backend, x)
            count, sum_dy, sum_dy_xmu = np.zeros(c), np.zeros(c), np.zeros(c)
        else:
            geometry = b.geometry(x, layout)
            xd, dyd = b.as_dense(x, geometry), b.as_dense(dy, geometry)
            sums = b.backward_sums(dyd, xd, save_mean, geometry)
            count, sum_dy, sum_dy_xmu = _device.to_host(sums, backend, x)
        own = (c, _checks.dtype_of(x), layout, count[0], sum_dy, sum_dy_xmu)
        return own, (backend, geometry, xd, dyd, BackwardSums(*sums))

    parts, (backend, geometry, xd, dyd, sums) = _exchange(engine, compute, "batch_norm_backward")
    host = [BackwardSums(*p) for p in parts]
    total = host[0].merge(*host[1:])
    if float(total.count[0]) < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got "
                         f"{float(total.count[0]):g} over the {engine.size} ranks")
    b = backend.module
    dtype = _checks.dtype_of(x)
    dweight, dbias = b.parameter_gradients(sums, save_invstd, dtype)
    total = BackwardSums(*_device.to_backend(total, backend, x))
    coefficients = b.backward_coefficients(total, save_mean, save_invstd, weight, True, dtype)
    dx = _device.empty_like(x, out, dtype) if x.shape[0] == 0 else b.backward_apply(dyd, xd, coefficients,
                                                                                     geometry, out)
    return dx, dweight, dbias


def _eval_backward(dy, x, save_mean, save_invstd, weight, training, layout, out, arrays):
    """Eval (frozen statistics): no communication; an empty local batch gets an empty ``dx``."""
    if not (_is_empty_batch(x) and _is_empty_batch(dy)):
        return _local_backward(dy, x, save_mean, save_invstd, weight, training=training, layout=layout, out=out)
    backend = select_backend(arrays)
    _checks.check_backward_args(_stand_in(dy, layout), _stand_in(x, layout), save_mean, save_invstd, weight,
                                training, layout, backend.storage_dtypes, _param_dtype(x), backend.statistics_dtypes)
    dtype = _checks.dtype_of(x)
    _checks.check_out(out, "out", x.shape, dtype)
    c = _channels(x, layout)
    zeros = _device.to_backend((np.zeros(c), np.zeros(c)), backend, x)
    sums = BackwardSums(zeros[0], zeros[0], zeros[1])
    dweight, dbias = backend.module.parameter_gradients(sums, save_invstd, dtype)
    return _device.empty_like(x, out, dtype), dweight, dbias


def batch_stats(x, *, comm, layout="NCHW"):
    """Per-channel mean and population variance of the union of every rank's ``x``
    (collective; bitwise the same on every rank), float64 (C,) where ``x`` lives
    (float32 for float16 device input)."""
    engine = engine_for(comm)

    def local_check(backend):
        _checks.check_layout(layout)
        _checks.check_input(_stand_in(x, layout), "x", backend.storage_dtypes)

    merged, backend, _, _ = _gather_moments(engine, x, layout, {"x": x}, local_check, "batch_stats")
    _check_global_count(merged, engine, 1, "the statistics of an empty batch are undefined")
    return backend.module.mean_var(Moments(*_device.to_backend(merged, backend, x)), _checks.dtype_of(x))

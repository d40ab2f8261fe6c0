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
/ :func:`fastbn.batch_stats` (NumPy arrays), with these differences:

- Training (``training=True``) is collective: every rank of ``comm`` must call the same
  function.  Forward: each rank's per-channel :class:`~fastbn.Moments` (count, mean,
  M2) travel in one allgather with a small header (channel count, dtype, layout,
  whether this rank's arguments were valid), and every rank merges them with Chan's
  formula **in rank order**, so the statistics, ``save_mean``/``save_invstd`` and the
  running statistics are bitwise identical on every rank whatever the message order.
  The running variance is unbiased with the global count.  Backward: one allgather of
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

Host (NumPy) arrays only: CUDA device arrays raise TypeError here.
"""

import numpy as np

from .. import _checks
from .._api import _param_dtype, batch_norm_backward as _local_backward, batch_norm_forward as _local_forward
from .._dispatch import select_backend
from ..stats import BackwardSums, Moments
from ._engines import engine_for

__all__ = ["batch_norm_forward", "batch_norm_backward", "batch_stats"]

#: Version of the gathered payload; ranks running different fastbn releases disagree on it.
_PROTOCOL = 1


def _host_backend(arrays):
    backend = select_backend(arrays)
    if backend.name != "cpu":
        raise TypeError("fastbn.distributed: expected numpy.ndarray arguments (CUDA device arrays "
                        "are not supported here), got device arrays")
    return backend


def _is_empty_batch(x):
    return isinstance(x, np.ndarray) and 2 <= x.ndim <= 5 and x.shape[0] == 0


def _stand_in(x, layout):
    """``x`` as the single-process checks see it: an empty batch (``x.shape[0] == 0``)
    or one with fewer than two values per channel is legal here (the whole batch counts),
    so those checks run on a zero-cost broadcast array of x's dtype with a batch of 2."""
    if not (isinstance(x, np.ndarray) and not isinstance(x, np.ma.MaskedArray)
            and 2 <= x.ndim <= 5 and x.shape[0] < 2 and 0 not in x.shape[1:]):
        return x
    return np.broadcast_to(np.zeros((), x.dtype), (2, *x.shape[1:]))


def _header(x, layout):
    c = x.shape[_checks.channel_axis(x.ndim, layout)]
    return {"protocol": _PROTOCOL, "ok": True, "channels": int(c), "dtype": x.dtype.str, "layout": layout}


def _failure(error):
    return {"protocol": _PROTOCOL, "ok": False, "error": f"{type(error).__name__}: {error}"}


def _agree(engine, gathered, own_error, what):
    """Raise on every rank when any rank failed its checks or the ranks disagree."""
    headers = [g[0] for g in gathered]
    if own_error is not None:
        raise own_error
    failed = [r for r, h in enumerate(headers) if not h.get("ok") or h.get("protocol") != _PROTOCOL]
    if failed:
        details = "; ".join(f"rank {r}: {headers[r].get('error', 'protocol mismatch')}" for r in failed)
        raise ValueError(f"{what}: rank(s) {failed} of {engine.size} ({engine.name}) failed their "
                         f"argument checks, so no rank computed ({details})")
    for key in ("channels", "dtype", "layout"):
        values = [h[key] for h in headers]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {str(np.dtype(v)) if key == 'dtype' else v}"
                              for r, v in enumerate(values))
            raise ValueError(f"{what}: expected every rank to pass the same {key} "
                             f"({engine.name}, {engine.size} ranks), got {shown}")


def _gather_moments(engine, x, layout, local_check, what):
    """Local checks, then ONE allgather of (header, count, mean, M2); returns
    (merged Moments in rank order, backend, geometry, dense x) on every rank."""
    error, payload = None, None
    try:
        local_check()
        backend = _host_backend({"x": x})
        b = backend.module
        if x.shape[0] == 0:
            c = x.shape[_checks.channel_axis(x.ndim, layout)]
            m, geometry = Moments.empty(c), None
        else:
            geometry = b.geometry(x, layout)
            x = b.as_dense(x, geometry)
            m = b.moments(x, geometry)
        payload = (_header(x, layout), tuple(np.ascontiguousarray(v, np.float64) for v in m))
    except Exception as e:  # noqa: BLE001 - whatever failed here, the other ranks must not block
        error, payload = e, (_failure(e), None)
    gathered = engine.allgather(payload)
    _agree(engine, gathered, error, what)
    parts = [Moments(*g[1]) for g in gathered]
    return parts[0].merge(*parts[1:]), backend, geometry, x


def _check_global_count(merged, engine, minimum, shape_note):
    total = float(merged.count[0])
    if total < minimum:
        raise ValueError(f"Expected more than {minimum - 1} value per channel when training, got "
                         f"{total:g} value(s) per channel over the {engine.size} ranks ({shape_note})")


def _empty_like(x, out):
    return out if out is not None else np.empty(x.shape, x.dtype)


def batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None, comm,
                       training=True, momentum=0.1, eps=1e-5, layout="NCHW", out=None):
    """Synchronized :func:`fastbn.batch_norm_forward` over the ranks of ``comm`` (see the module).

    Returns ``(y, save_mean, save_invstd)``: ``y`` for this rank's ``x`` (empty when
    ``x.shape[0] == 0``), the global batch's float64 mean and 1/sqrt(var + eps) (the same
    bits on every rank) in training, the running ones in eval.
    """
    engine = engine_for(comm)
    if not (isinstance(training, (bool, np.bool_)) and training):
        return _eval_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, layout, out)

    def local_check():
        backend = _host_backend({"x": x, "weight": weight, "bias": bias, "running_mean": running_mean,
                                 "running_var": running_var, "out": out})
        _checks.check_forward_args(_stand_in(x, layout), weight, bias, running_mean, running_var, True,
                                   momentum, eps, layout, backend.storage_dtypes, _param_dtype(x))
        _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))

    merged, backend, geometry, xd = _gather_moments(engine, x, layout, local_check, "batch_norm_forward")
    _check_global_count(merged, engine, 2, "training needs more than one value per channel in the whole batch")
    b = backend.module
    dtype = _checks.dtype_of(x)
    coefficients = b.forward_coefficients(
        merged.count, merged.mean, merged.m2, True, weight, bias, float(eps), running_mean, running_var,
        float(momentum), running_mean is not None, dtype)
    y = _empty_like(x, out) if x.shape[0] == 0 else b.apply(xd, coefficients, geometry, out)
    return y, coefficients.mean, coefficients.invstd


def _eval_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, layout, out):
    """Eval: no communication; an empty local batch gets an empty ``y``."""
    if not _is_empty_batch(x):
        return _local_forward(x, weight, bias, running_mean=running_mean, running_var=running_var,
                              training=training, momentum=momentum, eps=eps, layout=layout, out=out)
    # Same checks (and messages) as the local call, on a stand-in batch of x's shape.
    _, mean, invstd = _local_forward(np.ascontiguousarray(_stand_in(x, layout)), weight, bias, running_mean=running_mean,
                                     running_var=running_var, training=training, momentum=momentum,
                                     eps=eps, layout=layout)
    _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
    return _empty_like(x, out), mean, invstd


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, comm, training=True,
                        layout="NCHW", out=None):
    """Synchronized :func:`fastbn.batch_norm_backward` over the ranks of ``comm`` (see the module).

    Returns ``(dx, dweight, dbias)``: ``dx`` for this rank's part (empty when
    ``x.shape[0] == 0``) through the whole batch's statistics; ``dweight`` and ``dbias``
    this rank's contributions (sum them over the ranks for the whole batch's).
    """
    engine = engine_for(comm)
    if not (isinstance(training, (bool, np.bool_)) and training):
        return _eval_backward(dy, x, save_mean, save_invstd, weight, training, layout, out)
    error, payload = None, None
    try:
        backend = _host_backend({"dy": dy, "x": x, "save_mean": save_mean, "save_invstd": save_invstd,
                                 "weight": weight, "out": out})
        _checks.check_backward_args(_stand_in(dy, layout), _stand_in(x, layout), save_mean, save_invstd,
                                    weight, True, layout, backend.storage_dtypes, _param_dtype(x),
                                    backend.statistics_dtypes)
        _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
        b = backend.module
        c = x.shape[_checks.channel_axis(x.ndim, layout)]
        if x.shape[0] == 0:
            sums, geometry = BackwardSums(np.zeros(c), np.zeros(c), np.zeros(c)), None
        else:
            geometry = b.geometry(x, layout)
            x, dy = b.as_dense(x, geometry), b.as_dense(dy, geometry)
            sums = b.backward_sums(dy, x, save_mean, geometry)
        payload = (_header(x, layout), tuple(np.ascontiguousarray(v, np.float64) for v in sums))
    except Exception as e:  # noqa: BLE001 - whatever failed here, the other ranks must not block
        error, payload = e, (_failure(e), None)
    gathered = engine.allgather(payload)
    _agree(engine, gathered, error, "batch_norm_backward")
    parts = [BackwardSums(*g[1]) for g in gathered]
    total = parts[0].merge(*parts[1:])
    if float(total.count[0]) < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got "
                         f"{float(total.count[0]):g} over the {engine.size} ranks")
    dtype = _checks.dtype_of(x)
    dweight, dbias = b.parameter_gradients(sums, save_invstd, dtype)
    coefficients = b.backward_coefficients(total, save_mean, save_invstd, weight, True, dtype)
    dx = _empty_like(x, out) if x.shape[0] == 0 else b.backward_apply(dy, x, coefficients, geometry, out)
    return dx, dweight, dbias


def _eval_backward(dy, x, save_mean, save_invstd, weight, training, layout, out):
    """Eval (frozen statistics): no communication; an empty local batch gets an empty ``dx``."""
    if not (_is_empty_batch(x) and _is_empty_batch(dy)):
        return _local_backward(dy, x, save_mean, save_invstd, weight, training=training, layout=layout, out=out)
    _local_backward(np.ascontiguousarray(_stand_in(dy, layout)), np.ascontiguousarray(_stand_in(x, layout)),
                    save_mean, save_invstd, weight, training=training, layout=layout)
    _checks.check_out(out, "out", x.shape, _checks.dtype_of(x))
    c = x.shape[_checks.channel_axis(x.ndim, layout)]
    zeros = np.zeros(c, _param_dtype(x))
    return _empty_like(x, out), zeros, zeros.copy()


def batch_stats(x, *, comm, layout="NCHW"):
    """Per-channel mean and population variance of the union of every rank's ``x``
    (collective; bitwise the same on every rank), float64 (C,)."""
    engine = engine_for(comm)

    def local_check():
        backend = _host_backend({"x": x})
        _checks.check_layout(layout)
        _checks.check_input(_stand_in(x, layout), "x", backend.storage_dtypes)

    merged, backend, _, _ = _gather_moments(engine, x, layout, local_check, "batch_stats")
    _check_global_count(merged, engine, 1, "the statistics of an empty batch are undefined")
    return backend.module.mean_var(merged, _checks.dtype_of(x))


def _payload_bytes(num_channels):
    """Bytes of one rank's pickled forward payload for ``num_channels`` (benchmarks)."""
    import pickle

    x = np.zeros((1, num_channels), np.float32)
    m = Moments.empty(num_channels)
    return len(pickle.dumps((_header(x, "NCHW"), tuple(m)), protocol=pickle.HIGHEST_PROTOCOL))


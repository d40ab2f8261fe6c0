"""Plans of repeated calls: a public call whose arguments have the structure of an earlier
call that passed every check skips the checks and the set-up, and runs its kernel at once.

A training loop calls batch norm with the same kinds of arrays at every step.  Every
argument check (:mod:`fastbn._checks`) looks only at the arrays' types, shapes, strides,
dtypes and writeable flags and at the scalars' types and values, so their outcome is a
function of that *structure*.  On a small tensor the checks, the geometry and the views
cost several times the arithmetic (tens of microseconds against a few).  So
:mod:`fastbn._api` keys each call by its structure (:func:`forward_key`,
:func:`backward_key`); the first call of a structure runs the checked path, which stores
the backend's plan for it (a callable taking the arrays, e.g.
:class:`fastbn.cpu.fused.SmallForward`), and later calls of the same structure run the
plan.  The one property a key cannot hold, whether the running statistics share memory,
is tested per call (:func:`lookup`), and so is the overlap of ``out`` with the inputs
(by the plan's compiled kernel, which writes through a temporary when they overlap in
part).  A plan is also a choice of kernels, so keys hold the threshold that makes it
(``fastbn.cpu.small.SMALL_SIZE``, which tests and ``python -m fastbn warmup`` change to
reach the parallel kernels).

Only plain-NumPy calls of the common form have keys (no epilogue or virtual batches;
``training`` a Python bool; ``momentum`` and ``eps`` Python floats); every other call
runs the checked path, as does the first of each structure.  Plans are immutable,
so concurrent calls share them; at most :data:`MAX_PLANS` are kept.
"""

import numpy as np

from .cpu import small

#: Plans kept at most; a program cycling through more structures starts over.
MAX_PLANS = 256

_plans = {}


class _NoKey(Exception):
    """An argument that is neither None nor a numpy.ndarray: the call takes the checked path."""


def _vector(v):
    """The structure of a per-channel vector argument (None for an absent one)."""
    if v is None:
        return None
    if type(v) is not np.ndarray:
        raise _NoKey
    return v.shape, v.dtype


def _updated(v, training):
    """The structure of a running statistic: updated in place in training, so writability counts."""
    if v is None:
        return None
    if type(v) is not np.ndarray:
        raise _NoKey
    return v.shape, v.dtype, training and v.flags.writeable


def _output(out):
    """The structure of an ``out`` argument: written in place, in its memory order."""
    if out is None:
        return None
    if type(out) is not np.ndarray:
        raise _NoKey
    return out.shape, out.strides, out.dtype, out.flags.writeable


def forward_key(x, weight, bias, running_mean, running_var, training, momentum, eps, layout, out):
    """The structure of a :func:`fastbn.batch_norm_forward` call without epilogue or
    virtual batches, or None when the call always takes the checked path."""
    if (type(x) is not np.ndarray or (training is not True and training is not False)
            or type(momentum) is not float or type(eps) is not float):
        return None
    try:
        return ("forward", small.SMALL_SIZE, x.shape, x.strides, x.dtype, layout, training, momentum, eps,
                _vector(weight), _vector(bias), _updated(running_mean, training), _updated(running_var, training),
                _output(out))
    except _NoKey:
        return None


def backward_key(dy, x, save_mean, save_invstd, weight, training, layout, out):
    """The structure of a :func:`fastbn.batch_norm_backward` call without epilogue or
    virtual batches, or None when the call always takes the checked path."""
    if type(x) is not np.ndarray or type(dy) is not np.ndarray or (training is not True and training is not False):
        return None
    try:
        return ("backward", small.SMALL_SIZE, dy.shape, dy.strides, dy.dtype, x.shape, x.strides, x.dtype,
                _vector(save_mean), _vector(save_invstd), _vector(weight), training, layout, _output(out))
    except _NoKey:
        return None


def lookup(key, updated_mean=None, updated_var=None):
    """The plan stored for ``key`` (None: none, or no key), unless the running statistics
    the call updates share memory: that call must reach the check that refuses it."""
    if key is None:
        return None
    plan = _plans.get(key)
    if plan is not None and updated_mean is not None and not _separate(updated_mean, updated_var):
        return None
    return plan


def _separate(a, b):
    """True when arrays ``a`` and ``b`` cannot share memory: each owns its buffer (two
    allocations), or NumPy's bounds test says so."""
    return (a.base is None and b.base is None and a is not b) or not np.may_share_memory(a, b)


def store(key, plan):
    """Keep ``plan`` for calls of structure ``key`` (a key from this module, of a call that
    passed every check)."""
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[key] = plan

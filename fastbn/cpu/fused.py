"""The public forward and backward passes of small tensors in one compiled call each.

Up to :data:`fastbn.cpu.small.SMALL_SIZE` values, a pass costs microseconds, and a call
per stage (statistics, coefficients, apply), each with its Python-side temporaries and
dispatch, cost more than the arithmetic.  These kernels run the same serial stage
kernels (:mod:`fastbn.cpu.small`, :mod:`fastbn.cpu.channels`) from one compiled
function, in the same order on the same dtypes, so their results are bitwise those of
the stage-by-stage composition in :mod:`fastbn._api` (tested).

Absent optional vectors (weight, bias, running statistics) are passed as placeholders of
the parameter dtype and length C (the plan's zeros), read but not used, as in
:mod:`fastbn.algebra`.
"""

import functools

import numpy as np

from .. import dtypes
from . import channels, small, views
from ._jit import inline_helper, serial_kernel
from .stages import epilogue_floor


@inline_helper
def partial_overlap(a, b):
    """True when C-contiguous arrays ``a`` and ``b`` of one shape and dtype share bytes
    without being the same array: an elementwise pass from ``b`` into ``a`` would then
    read values it has already written.  (The same array is fine: each value is read
    before it is written.)"""
    a0 = a.ctypes.data
    b0 = b.ctypes.data
    return a0 != b0 and a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


@inline_helper
def copy_values(dst, src):
    """dst[...] = src for C-contiguous arrays of one shape (a flat loop: an array
    assignment compiles Numba's general broadcasting code, seconds of a cold first call)."""
    d = dst.reshape(dst.size)
    s = src.reshape(src.size)
    for i in range(d.size):
        d[i] = s[i]


@serial_kernel
def small_forward(x3, weight, bias, use_weight, use_bias, eval_mean, eval_var, running_mean, running_var,
                  training, update_running, momentum, eps, big, saved, residual3, floor, y3):
    """Statistics (training) or running statistics (eval), coefficients and apply.

    x3, y3: (outer, kept, inner) C-contiguous (``y3`` may be ``x3`` itself; a partial
    overlap with x3 or residual3 is written through a temporary); weight, bias: (kept,) or
    placeholders; eval_mean, eval_var: the statistics eval normalizes with (may be
    read-only; placeholders in training); running_mean, running_var: updated in training
    when ``update_running`` (placeholders otherwise, never written); saved: (2, kept)
    output (save_mean, save_invstd) in the statistics dtype (the batch mean is kept in
    float64 until the coefficients are made, as in the stages, whatever that dtype);
    residual3, floor: the epilogue of :func:`fastbn.cpu.small.small_apply` (``floor`` in
    the compute dtype).
    """
    kept = saved.shape[1]
    coefficients = np.empty((3, kept), weight.dtype)  # scratch: the compute dtype is the parameter dtype
    center, scale, shift = coefficients[0], coefficients[1], coefficients[2]
    if training:
        count = np.empty(kept)
        mean = np.empty(kept)
        m2 = np.empty(kept)
        small.small_moments(x3, count, mean, m2)
        channels.forward_coefficients(count, mean, m2, True, weight, bias, use_weight, use_bias, eps, big,
                                      momentum, running_mean, running_var, update_running,
                                      saved[0], saved[1], center, scale, shift)
    else:
        channels.forward_coefficients(eval_mean, eval_mean, eval_var, False, weight, bias, use_weight,
                                      use_bias, eps, big, momentum, running_mean, running_var, False,
                                      saved[0], saved[1], center, scale, shift)
    through = partial_overlap(y3, x3)
    if residual3 is not None:
        through = through or partial_overlap(y3, residual3)
    target = np.empty_like(y3) if through else y3
    small.small_apply(x3, residual3, center, scale, shift, floor, target)
    if through:
        copy_values(y3, target)


@serial_kernel
def small_backward(dy3, x3, save_mean, save_invstd, weight, use_weight, training, big, grads, floor, dx3):
    """Sums, dweight/dbias, dx coefficients and the dx pass.

    dy3, x3, dx3: (outer, kept, inner) C-contiguous (``dx3`` may be ``dy3`` or ``x3``
    itself; a partial overlap is written through a temporary); save_mean, save_invstd:
    (kept,); weight: (kept,) or a placeholder; grads: (2, kept) output (dweight, dbias) in
    the parameter dtype; floor: -inf in the compute dtype (eval's dx pass is an apply
    without epilogue).
    """
    kept = save_invstd.size
    count = np.empty(kept)
    sum_dy = np.empty(kept)
    sum_dy_xmu = np.empty(kept)
    small.small_backward_sums(dy3, x3, None, save_mean, count, sum_dy, sum_dy_xmu)
    channels.weight_bias_gradients(sum_dy, sum_dy_xmu, save_invstd, grads[0], grads[1])
    coefficients = np.empty((4, kept), weight.dtype)  # scratch: the compute dtype is the parameter dtype
    center, dy_scale, x_scale, shift = coefficients[0], coefficients[1], coefficients[2], coefficients[3]
    channels.backward_coefficients(count, sum_dy, sum_dy_xmu, save_mean, save_invstd, weight, use_weight,
                                   training, big, center, dy_scale, x_scale, shift)
    through = partial_overlap(dx3, dy3) or partial_overlap(dx3, x3)
    target = np.empty_like(dx3) if through else dx3
    if training:
        small.small_backward_apply(dy3, x3, None, center, dy_scale, x_scale, shift, target, None)
    else:
        small.small_apply(dy3, None, center, dy_scale, shift, floor, target)
    if through:
        copy_values(dx3, target)


class _SmallPass:
    """What a one-call pass of one geometry and dtype works out once: its kernel views,
    the dtype policy's dtypes, the saturation bound, the epilogue's floor and the
    placeholder of absent vectors (zeros of length C in the parameter dtype, never
    written).  Immutable, so one plan serves concurrent calls."""

    def __init__(self, geom, dtype, training, activation=None):
        policy = dtypes.policy(dtype)
        self.views = views.kernel_views(geom, np.dtype(dtype))
        self.training = training
        self.statistics, self.parameters, self.compute = policy.statistics, policy.parameters, policy.compute
        self.big = dtypes.largest(policy.compute)
        self.floor = epilogue_floor(activation, policy.compute)
        self.placeholder = np.zeros(geom.kept, policy.parameters)


class SmallForward(_SmallPass):
    """:func:`fastbn.batch_norm_forward` of a small tensor of one geometry and dtype, set up
    once (``SmallForward(geom, dtype, training, activation=None)``): calling it with arrays
    of that structure (``x`` dense in ``geom``'s order) runs the whole pass in one compiled call."""

    def __call__(self, x, weight, bias, running_mean, running_var, momentum, eps, out=None, residual=None):
        """``(y, save_mean, save_invstd)``; ``out``, ``residual`` as in batch_norm_forward."""
        kv = self.views
        y, y3 = kv.output(out)
        saved = np.empty((2, kv.geometry.kept), self.statistics)
        placeholder = self.placeholder
        if self.training:
            eval_mean = eval_var = placeholder
            update = running_mean is not None
            if not update:
                running_mean = running_var = placeholder
        else:
            eval_mean, eval_var = running_mean, running_var
            running_mean = running_var = placeholder
            update = False
        small_forward(kv.view(x), placeholder if weight is None else weight, placeholder if bias is None else bias,
                      weight is not None, bias is not None, eval_mean, eval_var, running_mean, running_var,
                      self.training, update, momentum, eps, self.big, saved,
                      None if residual is None else kv.view(residual), self.floor, y3)
        return views.finish_output(y, out), saved[0], saved[1]  # indexing: unpacking iterates, ~3x slower


class SmallBackward(_SmallPass):
    """:func:`fastbn.batch_norm_backward` of a small tensor of one geometry and dtype in
    one compiled call (``SmallBackward(geom, dtype, training)``, as :class:`SmallForward`)."""

    def __call__(self, dy, x, save_mean, save_invstd, weight, out=None):
        """``(dx, dweight, dbias)``; ``out`` as in batch_norm_backward."""
        kv = self.views
        dx, dx3 = kv.output(out)
        grads = np.empty((2, kv.geometry.kept), self.parameters)
        small_backward(kv.view(dy), kv.view(x), save_mean, save_invstd, self.placeholder if weight is None else weight,
                       weight is not None, self.training, self.big, grads, self.floor, dx3)
        return views.finish_output(dx, out), grads[0], grads[1]


#: Plans by (geometry, dtype, training[, activation]): a training loop builds each once.
_small_forward = functools.lru_cache(maxsize=256)(SmallForward)
_small_backward = functools.lru_cache(maxsize=256)(SmallBackward)


def is_small(geom):
    """True when a tensor of ``geom`` runs the one-call passes (at most ``SMALL_SIZE`` values)."""
    return geom.outer * geom.kept * geom.inner <= small.SMALL_SIZE


def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, geom, out, dtype,
            residual=None, activation=None):
    """``(y, save_mean, save_invstd)`` of :func:`fastbn.batch_norm_forward` (with its
    epilogue) in one compiled call, for ``x`` (dense in ``geom``'s order) of at most
    ``SMALL_SIZE`` values; None for larger ones (the caller runs the stages)."""
    plan = forward_plan(geom, dtype, training, activation)
    return None if plan is None else plan(x, weight, bias, running_mean, running_var, momentum, eps, out, residual)


def backward(dy, x, save_mean, save_invstd, weight, training, geom, out, dtype):
    """``(dx, dweight, dbias)`` of :func:`fastbn.batch_norm_backward` in one compiled
    call for at most ``SMALL_SIZE`` values; None for larger ones."""
    plan = backward_plan(geom, dtype, training)
    return None if plan is None else plan(dy, x, save_mean, save_invstd, weight, out)


def forward_plan(geom, dtype, training, activation=None):
    """The :class:`SmallForward` plan of a dense ``geom`` (see :mod:`fastbn._call_plans`),
    or None for tensors above ``SMALL_SIZE`` values."""
    return _small_forward(geom, dtype, training, activation) if is_small(geom) else None


def backward_plan(geom, dtype, training):
    """The :class:`SmallBackward` plan of a dense ``geom``, or None above ``SMALL_SIZE`` values."""
    return _small_backward(geom, dtype, training) if is_small(geom) else None

"""fastbn's batch norm as PyTorch operators: ``torch.ops.fastbn.batch_norm`` and
``torch.ops.fastbn.batch_norm_backward`` (eager kernels, fake kernels for the compiler,
vmap rules), and :func:`batch_norm`, the entry point the layers call.

What runs where:

- forward (``fastbn::batch_norm``) and first-order backward (``fastbn::batch_norm_backward``)
  run on fastbn kernels;
- the derivative of the backward (double backward: Hessian-vector products, gradient
  penalties), the gradient flowing into the saved batch statistics, and the forward-mode
  (jvp) formulas of both operators, forward-over-reverse included, are written with
  differentiable torch ops, so any order of differentiation works
  (:mod:`fastbn.torch._ops_autograd`);
- under ``torch.func`` transforms and forward-mode AD the operators are called through
  ``autograd.Function`` classes that carry the jvp formulas; ``vmap`` folds the vmapped
  dimension into the channels (each vmapped slice is normalized on its own, as torch
  does);
- eager calls on plain CPU/CUDA tensors skip the operator's dispatch: the same kernels
  and derivative through one ``autograd.Function`` (:class:`EagerBatchNorm`), which
  updates the running statistics in place instead of returning new ones."""

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._api import batch_norm_backward, batch_norm_forward
from ._ops_autograd import (HALF_DTYPES, BatchNormFunction, _backward_backward, _backward_setup_context,
                            _forward_backward, _forward_setup_context, _needs_function, parameter_dtype)


class FastbnValueError(ValueError, RuntimeError):
    """A fastbn ValueError that is also a RuntimeError, the class torch raises for the
    same bad inputs (so ``except RuntimeError`` written for torch keeps working)."""


class FastbnTypeError(TypeError, NotImplementedError):
    """A fastbn TypeError that is also the NotImplementedError (a RuntimeError) torch
    raises for a dtype its batch norm does not implement."""


def _reraise_as_torch(error):
    """fastbn's argument errors as instances of torch's class too, same message.

    ``Expected more than 1 value per channel when training`` is a ValueError in torch
    as well; the dual class keeps that true.
    """
    if isinstance(error, RuntimeError):
        return error
    cls = FastbnTypeError if isinstance(error, TypeError) else FastbnValueError
    return cls(*error.args)


def _bfloat16_numpy():
    """``ml_dtypes.bfloat16``, NumPy's name for torch.bfloat16 (an optional dependency)."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("x: expected float32, float64 or float16 CPU tensors, or bfloat16 with ml_dtypes "
                        "installed (pip install ml_dtypes: NumPy names bfloat16 through it), got "
                        "torch.bfloat16 without ml_dtypes") from None
    return ml_dtypes.bfloat16


def _as_fastbn_array(tensor):
    """A tensor as the array fastbn's public functions take (None passes through).

    CPU: a NumPy view of the same memory; bfloat16 tensors as ``ml_dtypes.bfloat16``
    arrays, through their 16-bit integer view (NumPy has no bfloat16, so
    ``tensor.numpy()`` refuses them).  CUDA: a numba device-array view of the same
    memory through ``__cuda_array_interface__``.  Both refuse a tensor that requires
    grad, hence ``detach``, only then: this runs for every tensor of every call, and
    ``is_cpu``/``requires_grad`` cost a tenth of ``device.type``/``detach()``.
    """
    if tensor is None:
        return None
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.is_cpu:
        if tensor.dtype is torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(_bfloat16_numpy())
        return tensor.numpy()
    if not tensor.is_cuda:
        raise TypeError(f"fastbn.torch: expected a CPU or CUDA tensor, got one on {tensor.device}")
    from numba import cuda  # only CUDA tensors need numba.cuda

    return cuda.as_cuda_array(tensor)


def _as_tensor(array, device):
    """A fastbn result as a torch tensor on ``device``, without a copy where possible."""
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, np.ndarray):
        # An ml_dtypes bfloat16 array, which torch.from_numpy refuses (itemsize first:
        # NumPy computes a dtype's name on every access, several us).
        if array.itemsize == 2 and array.dtype.name == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    return torch.as_tensor(array, device=device)  # any __cuda_array_interface__ object


def _like(result, x):
    """``result`` with the strides ``torch.empty_like(x)`` has (what the fake kernels
    promise the compiler); a copy only when fastbn chose other strides.

    fastbn's results are dense; strides equal to x's then mean x is dense too (density is
    a property of shape and strides), whose strides ``empty_like`` keeps: the common case
    needs no template tensor.
    """
    if result.stride() == x.stride() and result.dtype == x.dtype:
        return result
    template = torch.empty_like(x)
    if result.stride() != template.stride() or result.dtype != x.dtype:
        return template.copy_(result)
    return result


def _statistics_dtype(x):
    """dtype of fastbn's saved statistics: float64, float32 for float16/bfloat16 input."""
    return torch.float32 if x.dtype in HALF_DTYPES else torch.float64


# --------------------------------------------------------------------------- forward op


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """``(y, save_mean, save_invstd)`` of fastbn's batch_norm_forward as tensors, ``y``
    with the strides of ``torch.empty_like(x)``; running statistics updated in place by
    the kernel when training with them.  fastbn allocates ``y``, which comes back through
    ``torch.from_numpy`` without a copy."""
    try:
        y, mean, invstd = batch_norm_forward(
            _as_fastbn_array(x), _as_fastbn_array(weight), _as_fastbn_array(bias),
            running_mean=_as_fastbn_array(running_mean), running_var=_as_fastbn_array(running_var),
            training=training, momentum=momentum, eps=eps, layout="NCHW")
    except (TypeError, ValueError) as error:
        raise _reraise_as_torch(error) from None
    device = x.device
    return _like(_as_tensor(y, device), x), _as_tensor(mean, device), _as_tensor(invstd, device)


def _overlaps(a, b):
    """True when (C,) tensors ``a`` and ``b`` (contiguous, one device) share memory."""
    start, end = a.data_ptr(), b.data_ptr()
    return start < end + b.nbytes and end < start + a.nbytes


def _batch_norm_in_place(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """``(y, save_mean, save_invstd)``, the running statistics updated in place when
    training with them (the body of :class:`EagerBatchNorm`; ``fastbn::batch_norm`` runs
    it on copies).  A momentum outside [0, 1] (torch accepts any) is applied with torch
    ops after the kernels, fastbn's taking [0, 1]."""
    updates = training and running_mean is not None
    in_range = 0.0 <= momentum <= 1.0
    kernel_updates = updates and in_range
    kernel_stats = (running_mean, running_var) if kernel_updates or not training else (None, None)
    y, mean, invstd = _forward(x, weight, bias, *kernel_stats, training,
                               momentum if kernel_updates else 0.0, eps)
    if kernel_updates:
        # Written by fastbn's kernels, unseen by autograd: the version counter says so.
        torch.autograd.graph.increment_version((running_mean, running_var))
    elif updates:
        count = x.numel() // x.shape[1]
        unbiased = (1.0 / invstd.square() - eps) * (count / (count - 1))
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    elif not training and (_overlaps(mean, running_mean) or _overlaps(invstd, running_var)):
        # Eval's statistics are the running ones: fastbn returns them as new arrays, but
        # were they the buffers themselves, the outputs (saved for backward, and an
        # operator's outputs) must not follow later updates of the buffers.
        mean, invstd = mean.clone(), invstd.clone()
    return y, mean, invstd


def _batch_norm_kernel(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """The body of ``fastbn::batch_norm``: :func:`_batch_norm_in_place` on copies of the
    running statistics (an operator's outputs must not alias its inputs)."""
    updates = training and running_mean is not None
    if updates:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    y, mean, invstd = _batch_norm_in_place(x, weight, bias, running_mean, running_var, training, momentum, eps)
    if not updates:
        running_mean, running_var = x.new_empty((0,)), x.new_empty((0,))
    return y, mean, invstd, running_mean, running_var


@torch.library.custom_op("fastbn::batch_norm", mutates_args=())
def batch_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  training: bool, momentum: float, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, save_mean, save_invstd, new_running_mean, new_running_var)``: fastbn's
    batch_norm_forward on the NCHW view of x.

    Functional, like ATen's ``_native_batch_norm_legit_functional``: torch registers
    autograd formulas only for operators that mutate nothing, so the updated running
    statistics are returned (computed by fastbn's kernels on copies) and the caller
    copies them into its buffers.  They are empty (0,) tensors unless training with
    running statistics.  A momentum outside [0, 1] (torch accepts any) is applied with
    torch ops, fastbn's kernels taking [0, 1].
    """
    return _batch_norm_kernel(x, weight, bias, running_mean, running_var, training, momentum, eps)


@batch_norm_op.register_fake
def _batch_norm_fake(x, weight, bias, running_mean, running_var, training, momentum, eps):
    channels = x.shape[1]
    dtype = _statistics_dtype(x)
    if training and running_mean is not None:
        new_mean, new_var = torch.empty_like(running_mean), torch.empty_like(running_var)
    else:
        new_mean, new_var = x.new_empty((0,)), x.new_empty((0,))
    return (torch.empty_like(x), x.new_empty((channels,), dtype=dtype), x.new_empty((channels,), dtype=dtype),
            new_mean, new_var)


# --------------------------------------------------------------------------- backward op


def _batch_norm_backward_kernel(dy, x, save_mean, save_invstd, weight, training):
    """The body of ``fastbn::batch_norm_backward`` (and the first-order backward of
    :class:`EagerBatchNorm`): ``dx`` with the strides of ``torch.empty_like(x)``, as in
    :func:`_forward`."""
    try:
        dx, dweight, dbias = batch_norm_backward(
            _as_fastbn_array(dy), _as_fastbn_array(x), _as_fastbn_array(save_mean),
            _as_fastbn_array(save_invstd), _as_fastbn_array(weight), training=training, layout="NCHW")
    except (TypeError, ValueError) as error:
        raise _reraise_as_torch(error) from None
    device = x.device
    return _like(_as_tensor(dx, device), x), _as_tensor(dweight, device), _as_tensor(dbias, device)


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(dy: Tensor, x: Tensor, save_mean: Tensor, save_invstd: Tensor,
                           weight: Optional[Tensor], training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of fastbn's batch_norm_backward; dweight/dbias are
    returned even when weight is None."""
    return _batch_norm_backward_kernel(dy, x, save_mean, save_invstd, weight, training)


@batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(dy, x, save_mean, save_invstd, weight, training):
    channels = x.shape[1]
    dtype = parameter_dtype(x)
    return torch.empty_like(x), x.new_empty((channels,), dtype=dtype), x.new_empty((channels,), dtype=dtype)


batch_norm_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)
batch_norm_backward_op.register_autograd(_backward_backward, setup_context=_backward_setup_context)


# --------------------------------------------------------------------------- eager


class EagerBatchNorm(torch.autograd.Function):
    """``fastbn::batch_norm`` without the operator's dispatch, for eager calls.

    Calling a ``torch.library.custom_op`` runs several layers of Python (argument
    defaults, a generated autograd Function, redispatch) before its kernel: measured on
    (256, 512) float32, 2 threads, the forward op took 0.45 ms where its kernel took
    0.15 ms, and the backward alike.  This Function runs the same kernel functions and
    the same derivative (:func:`fastbn.torch._ops_autograd._forward_backward`, whose
    first-order backward calls the backward kernel function directly; with
    ``create_graph`` it calls the backward operator, so higher orders work as before).
    :func:`batch_norm` uses it when nothing traces or transforms the call (see :func:`_eager`).
    Returns ``(y, save_mean, save_invstd)`` and updates the running statistics in place
    (buffers, outside autograd): no copies of them, as the operator needs.
    ``forward`` takes ``ctx`` (no separate ``setup_context``): with one, ``apply`` binds
    its arguments through ``inspect.signature`` at every call (~80 us here).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, mean, invstd = _batch_norm_in_place(x, weight, bias, running_mean, running_var, training, momentum, eps)
        _forward_setup_context(ctx, (x, weight, bias, running_mean, running_var, training, momentum, eps),
                               (y, mean, invstd, None, None))
        return y, mean, invstd

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_invstd):
        return _forward_backward(ctx, grad_y, grad_mean, grad_invstd, None, None, eager=_batch_norm_backward_kernel)


def _eager(x):
    """True when a call on ``x`` runs eagerly on real data: a plain CPU or CUDA tensor
    (not meta, not a subclass such as fake or functorch-wrapped ones), not under
    torch.compile, export or ``torch.jit.trace`` (which records the operator), and with
    no dispatch mode (tracing, fake tensors) active; the others need the operator and
    its registrations."""
    return (type(x) is torch.Tensor and (x.is_cpu or x.is_cuda) and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and torch._C._len_torch_dispatch_stack() == 0)


# --------------------------------------------------------------------------- vmap


def _fold(t, bdim, batch):
    """(…, N, C, …) with a vmapped dim -> (N, batch*C, …): each vmapped slice becomes
    its own group of channels, so it gets its own batch statistics, as under torch's vmap."""
    t = t.movedim(bdim, 0) if bdim is not None else t.unsqueeze(0).expand(batch, *t.shape)
    t = t.movedim(0, 1)
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])


def _fold_vector(v, bdim, batch):
    if v is None:
        return None
    v = v.movedim(bdim, 0) if bdim is not None else v.unsqueeze(0).expand(batch, *v.shape)
    return v.reshape(-1)


def _unfold(t, batch):
    """(N, batch*C, …) -> (N, batch, C, …), vmapped dim 1."""
    return t.reshape(t.shape[0], batch, t.shape[1] // batch, *t.shape[2:])


def _batch_norm_vmap(info, in_dims, x, weight, bias, running_mean, running_var, training, momentum, eps):
    batch = info.batch_size
    x_dim, w_dim, b_dim, rm_dim, rv_dim = in_dims[:5]
    updates = training and running_mean is not None
    if updates and (rm_dim is None or rv_dim is None):
        raise RuntimeError(
            "fastbn.torch: vmap over a training-mode batch norm that updates unbatched running "
            "statistics is not supported (as in torch): use eval mode, track_running_stats=False, "
            "or running statistics batched like the input")
    y, mean, invstd, new_mean, new_var = torch.ops.fastbn.batch_norm(
        _fold(x, x_dim, batch), _fold_vector(weight, w_dim, batch), _fold_vector(bias, b_dim, batch),
        _fold_vector(running_mean, rm_dim, batch), _fold_vector(running_var, rv_dim, batch),
        training, momentum, eps)
    if updates:
        new_mean, new_var = new_mean.view(batch, -1), new_var.view(batch, -1)
        new_dim = 0
    else:
        new_dim = None
    return ((_unfold(y, batch), mean.view(batch, -1), invstd.view(batch, -1), new_mean, new_var),
            (1, 0, 0, new_dim, new_dim))


def _batch_norm_backward_vmap(info, in_dims, dy, x, save_mean, save_invstd, weight, training):
    batch = info.batch_size
    dy_dim, x_dim, m_dim, s_dim, w_dim = in_dims[:5]
    dx, dweight, dbias = torch.ops.fastbn.batch_norm_backward(
        _fold(dy, dy_dim, batch), _fold(x, x_dim, batch), _fold_vector(save_mean, m_dim, batch),
        _fold_vector(save_invstd, s_dim, batch), _fold_vector(weight, w_dim, batch), training)
    return (_unfold(dx, batch), dweight.view(batch, -1), dbias.view(batch, -1)), (1, 0, 0)


batch_norm_op.register_vmap(_batch_norm_vmap)
batch_norm_backward_op.register_vmap(_batch_norm_backward_vmap)


def batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, batches=None):
    """``(y, save_mean, save_invstd)``, running statistics updated in place when training
    with them: :class:`EagerBatchNorm` (or its body alone when no gradient is recorded)
    for eager calls, :class:`BatchNormFunction` under torch.func transforms and
    forward-mode AD (which operators cannot define), else the operator.

    ``momentum=None`` with ``batches`` (a tensor, the number of batches seen including
    this one): cumulative moving average, ``r += (batch - r) / batches``.  Eagerly and
    under transforms as torch's module computes it, momentum ``1 / batches``; through the
    operator as a tensor, so torch.compile does not turn ``batches`` into a Python number.
    """
    transformed = _needs_function((x, weight, bias, running_mean, running_var))
    eager = not transformed and _eager(x)
    cumulative = momentum is None
    if cumulative and (transformed or eager):
        momentum, cumulative = 1.0 / float(batches), False
    args = (x, weight, bias, running_mean, running_var, bool(training),
            1.0 if cumulative else float(momentum), float(eps))
    if transformed:
        return BatchNormFunction.apply(*args)
    if eager:
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            return EagerBatchNorm.apply(*args)
        return _batch_norm_in_place(*args)  # nothing to record: the Function's body alone
    y, mean, invstd, new_mean, new_var = torch.ops.fastbn.batch_norm(*args)
    if training and running_mean is not None:
        with torch.no_grad():
            if cumulative:  # momentum 1 gave the batch statistics themselves
                factor = 1.0 / batches.to(running_mean.dtype)
                running_mean.lerp_(new_mean, factor)
                running_var.lerp_(new_var, factor)
            else:
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
    return y, mean, invstd

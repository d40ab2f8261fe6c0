"""fastbn's batch norm as PyTorch operators: ``torch.ops.fastbn.batch_norm`` and
``torch.ops.fastbn.batch_norm_backward``.

What runs where:

- forward (``fastbn::batch_norm``) and first-order backward (``fastbn::batch_norm_backward``)
  run on fastbn kernels;
- the derivative of the backward (double backward: Hessian-vector products, gradient
  penalties), the gradient flowing into the saved batch statistics, and the forward-mode
  (jvp) formula are written with differentiable torch ops, so any order of
  differentiation works;
- under ``torch.func`` transforms and forward-mode AD the operators are called through
  :class:`BatchNormFunction` (an ``autograd.Function`` with a ``jvp``); ``vmap`` folds the
  vmapped dimension into the channels (each vmapped slice is normalized on its own, as
  torch does).

Per channel, with ``mu``, ``s = 1/sqrt(var + eps)`` the saved statistics, ``w`` the
weight (1 when None) and sums over every axis but the channel one (``M`` values):
``dx = w*s*(dy - sum(dy)/M - (x - mu)*s^2*sum(dy*(x - mu))/M)`` in training (``w*s*dy``
in eval), ``dweight = s*sum(dy*(x - mu))``, ``dbias = sum(dy)``.
"""

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._api import batch_norm_backward, batch_norm_forward


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


def _as_fastbn_array(tensor):
    """A tensor as the array fastbn's public functions take (None passes through).

    CPU: a NumPy view of the same memory.  CUDA: a numba device-array view of the same
    memory through ``__cuda_array_interface__`` (refused by a tensor that requires grad,
    hence ``detach``).
    """
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.numpy()
    if tensor.device.type != "cuda":
        raise TypeError(f"fastbn.torch: expected a CPU or CUDA tensor, got one on {tensor.device}")
    from numba import cuda  # only CUDA tensors need numba.cuda

    return cuda.as_cuda_array(tensor)


def _as_tensor(array, device):
    """A fastbn result as a torch tensor on ``device``, without a copy where possible."""
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.as_tensor(array, device=device)  # any __cuda_array_interface__ object


def _like(result, x):
    """``result`` with the strides ``torch.empty_like(x)`` has (what the fake kernels
    promise the compiler); a copy only when fastbn chose other strides."""
    template = torch.empty_like(x)
    if result.stride() != template.stride() or result.dtype != x.dtype:
        return template.copy_(result)
    return result


def _statistics_dtype(x):
    """dtype of fastbn's saved statistics: float64, float32 for float16 input."""
    return torch.float32 if x.dtype == torch.float16 else torch.float64


# --------------------------------------------------------------------------- forward op


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
    updates = training and running_mean is not None
    in_range = 0.0 <= momentum <= 1.0
    new_mean = running_mean.clone() if updates else None
    new_var = running_var.clone() if updates else None
    kernel_stats = (new_mean, new_var) if updates and in_range else (None, None) if training \
        else (running_mean, running_var)
    try:
        y, mean, invstd = batch_norm_forward(
            _as_fastbn_array(x), _as_fastbn_array(weight), _as_fastbn_array(bias),
            running_mean=_as_fastbn_array(kernel_stats[0]), running_var=_as_fastbn_array(kernel_stats[1]),
            training=training, momentum=momentum if updates and in_range else 0.0, eps=eps, layout="NCHW")
    except (TypeError, ValueError) as error:
        raise _reraise_as_torch(error) from None
    y = _like(_as_tensor(y, x.device), x)
    # clone: in eval the statistics may be the running buffers themselves, and an
    # operator's outputs must not alias its inputs.
    mean = _as_tensor(mean, x.device).clone()
    invstd = _as_tensor(invstd, x.device).clone()
    if updates and not in_range:
        count = x.numel() // x.shape[1]
        unbiased = (1.0 / invstd.square() - eps) * (count / (count - 1))
        new_mean.mul_(1 - momentum).add_(mean.to(new_mean.dtype), alpha=momentum)
        new_var.mul_(1 - momentum).add_(unbiased.to(new_var.dtype), alpha=momentum)
    if not updates:
        new_mean, new_var = x.new_empty((0,)), x.new_empty((0,))
    return y, mean, invstd, new_mean, new_var


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


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(dy: Tensor, x: Tensor, save_mean: Tensor, save_invstd: Tensor,
                           weight: Optional[Tensor], training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of fastbn's batch_norm_backward; dweight/dbias are
    returned even when weight is None."""
    try:
        dx, dweight, dbias = batch_norm_backward(
            _as_fastbn_array(dy), _as_fastbn_array(x), _as_fastbn_array(save_mean),
            _as_fastbn_array(save_invstd), _as_fastbn_array(weight), training=training, layout="NCHW")
    except (TypeError, ValueError) as error:
        raise _reraise_as_torch(error) from None
    return (_like(_as_tensor(dx, x.device), x), _as_tensor(dweight, x.device).clone(),
            _as_tensor(dbias, x.device).clone())


@batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(dy, x, save_mean, save_invstd, weight, training):
    channels = x.shape[1]
    return torch.empty_like(x), x.new_empty((channels,)), x.new_empty((channels,))


# --------------------------------------------------------------------------- helpers


def _geometry(x):
    """(broadcast shape of a per-channel vector, reduction dims, values per channel)."""
    channels = x.shape[1]
    shape = (1, channels) + (1,) * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    return shape, dims, x.numel() // max(channels, 1)


def _stats_vjp(x, mean, invstd, grad_mean, grad_invstd):
    """Gradient on x from gradients on the batch statistics (training):
    d mean/dx = 1/M, d invstd/dx = -invstd^3 (x - mean)/M.  None when both are None."""
    if grad_mean is None and grad_invstd is None:
        return None
    shape, _, count = _geometry(x)
    grad = torch.zeros((), dtype=x.dtype, device=x.device)
    if grad_mean is not None:
        grad = grad + (grad_mean / count).to(x.dtype).view(shape)
    if grad_invstd is not None:
        s = invstd.to(x.dtype).view(shape)
        grad = grad - (grad_invstd.to(x.dtype).view(shape) * s ** 3) * (x - mean.to(x.dtype).view(shape)) / count
    return grad.expand(x.shape)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


# --------------------------------------------------------------------------- autograd


def _forward_setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, _, _ = inputs
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.training = training
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _forward_backward(ctx, grad_y, grad_mean, grad_invstd, _grad_new_mean, _grad_new_var):
    x, weight, mean, invstd = ctx.saved_tensors
    dx = dweight = dbias = None
    if grad_y is not None:
        args = (grad_y, x, mean, invstd, weight, ctx.training)
        # Under torch.func the operator's own autograd is not usable (torch's generated
        # Function for it has no setup_context); BackwardFunction wraps the same operator.
        op = BackwardFunction.apply if _needs_function(args[:5]) else torch.ops.fastbn.batch_norm_backward
        dx, dweight, dbias = op(*args)
    if ctx.training:  # in eval the statistics are the running ones: no path to x
        dx = _add(dx, _stats_vjp(x, mean, invstd, grad_mean, grad_invstd))
    return (dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None,
            None, None, None, None, None)


def _backward_setup_context(ctx, inputs, output):
    dy, x, mean, invstd, weight, training = inputs
    ctx.save_for_backward(dy, x, mean, invstd, weight)
    ctx.training = training


def _backward_backward(ctx, grad_dx, grad_dweight, grad_dbias):
    """Vector-Jacobian product of the backward pass (see the module docstring for dx),
    with mu and s as independent inputs (their dependence on x is _stats_vjp's); torch
    ops throughout, so it is differentiable itself."""
    dy, x, mean, invstd, weight = ctx.saved_tensors
    shape, dims, count = _geometry(x)
    mu, s = mean.to(x.dtype).view(shape), invstd.to(x.dtype).view(shape)
    w = weight.view(shape) if weight is not None else torch.ones((), dtype=x.dtype, device=x.device)
    d = x - mu
    sum_dy = dy.sum(dims, keepdim=True)
    sum_dy_d = (dy * d).sum(dims, keepdim=True)
    g_dy = g_x = g_w = g_mu = g_s = None
    if grad_dx is not None:
        u = grad_dx
        sum_u_dy = (u * dy).sum(dims, keepdim=True)
        if ctx.training:
            sum_u = u.sum(dims, keepdim=True)
            sum_u_d = (u * d).sum(dims, keepdim=True)
            g_dy = w * s * (u - sum_u / count - s * s * sum_u_d * d / count)
            g_x = -w * s ** 3 * (sum_u_d * dy + sum_dy_d * u) / count
            g_w = s * sum_u_dy - s * sum_dy * sum_u / count - s ** 3 * sum_dy_d * sum_u_d / count
            g_mu = w * s ** 3 * (sum_dy * sum_u_d + sum_dy_d * sum_u) / count
            g_s = w * (sum_u_dy - sum_dy * sum_u / count - 3 * s * s * sum_dy_d * sum_u_d / count)
        else:
            g_dy = w * s * u
            g_w = s * sum_u_dy
            g_s = w * sum_u_dy
    if grad_dweight is not None:
        a = grad_dweight.view(shape)
        g_dy = _add(g_dy, a * s * d)
        g_x = _add(g_x, a * s * dy)
        g_mu = _add(g_mu, -a * s * sum_dy)
        g_s = _add(g_s, a * sum_dy_d)
    if grad_dbias is not None:
        g_dy = _add(g_dy, grad_dbias.view(shape))
    channels = x.shape[1]

    def vector(g, dtype):
        return None if g is None else g.reshape(channels).to(dtype)

    return (None if g_dy is None else g_dy.expand(x.shape), None if g_x is None else g_x.expand(x.shape),
            vector(g_mu, mean.dtype), vector(g_s, invstd.dtype),
            vector(g_w, x.dtype) if weight is not None else None, None)


batch_norm_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)
batch_norm_backward_op.register_autograd(_backward_backward, setup_context=_backward_setup_context)


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


# --------------------------------------------------------------------------- torch.func, forward AD


class BatchNormFunction(torch.autograd.Function):
    """The forward operator with a forward-mode (jvp) formula, for torch.func and
    ``torch.autograd.forward_ad``; outside them :func:`batch_norm` calls the operator
    directly (torch.compile does not trace a Function that defines ``jvp``).

    Returns ``(y, save_mean, save_invstd)`` and copies the updated running statistics
    into their buffers here, below the transforms (a transform forbids mutating a
    captured tensor with one of its own outputs); backward is the operator's.
    ``generate_vmap_rule``: forward, backward and jvp are torch ops and the operators,
    which have vmap rules.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, mean, invstd, new_mean, new_var = torch.ops.fastbn.batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps)
        if training and running_mean is not None:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        return y, mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        _forward_setup_context(ctx, inputs, output + (None, None))
        x, weight, _, _, running_var, _, _, _ = inputs
        _, mean, invstd = output
        ctx.save_for_forward(x, weight, mean, invstd, running_var)

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_invstd):
        return _forward_backward(ctx, grad_y, grad_mean, grad_invstd, None, None)

    @staticmethod
    def jvp(ctx, tx, tweight, tbias, trunning_mean, trunning_var, *_):
        """Tangents of y, mean, invstd.  Training: t_mean = mean(tx),
        t_invstd = -invstd^3 mean((x - mean) tx); eval: from the running statistics'
        tangents (t_invstd = -invstd^3 t_var / 2)."""
        x, weight, mean, invstd, running_var = ctx.saved_tensors
        shape, dims, count = _geometry(x)
        mu, s = mean.to(x.dtype).view(shape), invstd.to(x.dtype).view(shape)
        d = x - mu
        t_mu = t_s = None
        if ctx.training:
            if tx is not None:
                t_mu = tx.mean(dims, keepdim=True)
                t_s = -s ** 3 * (d * tx).mean(dims, keepdim=True)
        else:
            if trunning_mean is not None:
                t_mu = trunning_mean.to(x.dtype).view(shape)
            if trunning_var is not None:
                t_s = -0.5 * s ** 3 * trunning_var.to(x.dtype).view(shape)
        t_xhat = None
        if tx is not None:
            t_xhat = tx * s
        if t_mu is not None:
            t_xhat = _add(t_xhat, -t_mu * s)
        if t_s is not None:
            t_xhat = _add(t_xhat, d * t_s)
        t_y = None
        if t_xhat is not None:
            t_y = t_xhat * weight.view(shape) if weight is not None else t_xhat
        if tweight is not None:
            t_y = _add(t_y, tweight.view(shape) * d * s)
        if tbias is not None:
            t_y = _add(t_y, tbias.view(shape))
        t_y = torch.zeros_like(x) if t_y is None else t_y.expand(x.shape)
        channels = x.shape[1]

        def vector(t, like):
            return torch.zeros_like(like) if t is None else t.reshape(channels).to(like.dtype)

        return t_y, vector(t_mu, mean), vector(t_s, invstd)


class BackwardFunction(torch.autograd.Function):
    """The backward operator with its registered derivative, for torch.func."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dy, x, save_mean, save_invstd, weight, training):
        return torch.ops.fastbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight, training)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _backward_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_dx, grad_dweight, grad_dbias):
        return _backward_backward(ctx, grad_dx, grad_dweight, grad_dbias)


def _needs_function(tensors):
    """True under torch.func transforms or forward-mode AD, where the operator alone
    (no jvp, no functorch-level autograd) is not enough."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and is_wrapped(t) for t in tensors)


def batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, batches=None):
    """``(y, save_mean, save_invstd)``, running statistics updated in place when training
    with them: the operator, or :class:`BatchNormFunction` under torch.func transforms
    and forward-mode AD (which operators cannot define).

    ``momentum=None`` with ``batches`` (a tensor, the number of batches seen including
    this one): cumulative moving average, ``r += (batch - r) / batches``, computed as a
    tensor so torch.compile does not turn ``batches`` into a Python number.
    """
    cumulative = momentum is None
    if cumulative and _needs_function((x, weight, bias, running_mean, running_var)):
        momentum, cumulative = 1.0 / float(batches), False
    args = (x, weight, bias, running_mean, running_var, bool(training),
            1.0 if cumulative else float(momentum), float(eps))
    if _needs_function(args[:5]):
        return BatchNormFunction.apply(*args)
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

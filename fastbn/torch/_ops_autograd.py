"""Derivatives of fastbn's PyTorch operators, written with differentiable torch ops so
that any order and mix of reverse and forward mode works:

- the vector-Jacobian products registered on ``fastbn::batch_norm`` (its backward: the
  ``fastbn::batch_norm_backward`` operator plus the gradient through the saved batch
  statistics) and on ``fastbn::batch_norm_backward`` (double backward);
- :class:`BatchNormFunction` and :class:`BackwardFunction`, the operators as
  ``autograd.Function`` classes with forward-mode (jvp) formulas, for torch.func transforms
  and ``torch.autograd.forward_ad`` (operators cannot define a jvp); the backward's jvp
  gives forward-over-reverse (``jvp(grad(f))``, ``jacfwd(jacrev(f))``, ``hessian``).

Per channel, with ``mu``, ``s = 1/sqrt(var + eps)`` the saved statistics, ``w`` the
weight (1 when None), ``d = x - mu`` and sums over every axis but the channel one
(``M`` values): ``dx = w*s*(dy - sum(dy)/M - d*s^2*sum(dy*d)/M)`` in training
(``w*s*dy`` in eval), ``dweight = s*sum(dy*d)``, ``dbias = sum(dy)``.  The backward
operator takes mu and s as independent inputs; their dependence on x (training) is
:func:`_stats_vjp`'s and the forward jvp's.
"""

import torch

# --------------------------------------------------------------------------- helpers

#: 16-bit storage dtypes: float32 statistics, parameters and parameter gradients (fastbn.dtypes).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def parameter_dtype(x):
    """dtype of weight, bias, running statistics and their gradients for input ``x``:
    x's own, float32 for float16/bfloat16 input (mixed precision, as torch)."""
    return torch.float32 if x.dtype in HALF_DTYPES else x.dtype



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
    # Unused outputs (save_mean, save_invstd: nearly always) get None, not zeros that
    # would cost _stats_vjp several passes over x.
    ctx.set_materialize_grads(False)
    ctx.training = training
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _forward_backward(ctx, grad_y, grad_mean, grad_invstd, _grad_new_mean, _grad_new_var, eager=None):
    """The forward's vector-Jacobian product.  ``eager``: the backward operator's kernel
    function, which a first-order backward (no graph recorded: grad mode off) may call
    directly instead of the operator (see ``fastbn.torch._ops.EagerBatchNorm``)."""
    x, weight, mean, invstd = ctx.saved_tensors
    dx = dweight = dbias = None
    if grad_y is not None:
        args = (grad_y, x, mean, invstd, weight, ctx.training)
        if _needs_function(args[:5]):
            # Under torch.func the operator's own autograd is not usable (torch's generated
            # Function for it has no setup_context); BackwardFunction wraps the same operator.
            op = BackwardFunction.apply
        elif eager is not None and not torch.is_grad_enabled():
            op = eager
        else:
            op = torch.ops.fastbn.batch_norm_backward
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
            vector(g_w, weight.dtype) if weight is not None else None, None)


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
    """The backward operator with its registered derivative and a forward-mode (jvp)
    formula, for torch.func and forward-over-reverse (``jvp(grad(f))``, ``hessian``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dy, x, save_mean, save_invstd, weight, training):
        return torch.ops.fastbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight, training)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _backward_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:5])

    @staticmethod
    def backward(ctx, grad_dx, grad_dweight, grad_dbias):
        return _backward_backward(ctx, grad_dx, grad_dweight, grad_dbias)

    @staticmethod
    def jvp(ctx, t_dy, t_x, t_mean, t_invstd, t_weight, _):
        """Tangents of (dx, dweight, dbias), differentiating the module docstring's
        formulas with mu and s as independent inputs; a missing tangent is zero."""
        dy, x, mean, invstd, weight = ctx.saved_tensors
        shape, dims, count = _geometry(x)
        mu, s = mean.to(x.dtype).view(shape), invstd.to(x.dtype).view(shape)
        w = weight.view(shape) if weight is not None else torch.ones((), dtype=x.dtype, device=x.device)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)

        def tangent(t, like=None):
            if t is None:
                return zero
            return t.to(x.dtype) if like is None else t.to(x.dtype).view(shape)

        t_dy, t_x = tangent(t_dy), tangent(t_x)
        t_mu, t_s, t_w = tangent(t_mean, shape), tangent(t_invstd, shape), tangent(t_weight, shape)
        d = x - mu
        t_d = t_x - t_mu
        sum_dy_d = (dy * d).sum(dims, keepdim=True)
        t_sum_dy = t_dy.expand(dy.shape).sum(dims, keepdim=True)
        t_sum_dy_d = (t_dy * d + dy * t_d).sum(dims, keepdim=True)
        if ctx.training:
            sum_dy = dy.sum(dims, keepdim=True)
            a = dy - sum_dy / count - d * s * s * sum_dy_d / count
            t_a = t_dy - t_sum_dy / count - (t_d * s * s * sum_dy_d + 2 * d * s * t_s * sum_dy_d
                                              + d * s * s * t_sum_dy_d) / count
        else:
            a, t_a = dy, t_dy
        t_dx = (t_w * s + w * t_s) * a + w * s * t_a
        channels = x.shape[1]
        t_dweight = t_s * sum_dy_d + s * t_sum_dy_d
        grads = parameter_dtype(x)
        return (t_dx.expand(x.shape).to(x.dtype), t_dweight.reshape(channels).to(grads),
                t_sum_dy.reshape(channels).to(grads))


def _needs_function(tensors):
    """True under torch.func transforms or forward-mode AD, where the operator alone
    (no jvp, no functorch-level autograd) is not enough."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and is_wrapped(t) for t in tensors)


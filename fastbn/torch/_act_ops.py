"""Batch norm with a fused residual add and ReLU as PyTorch operators:
``torch.ops.fastbn.batch_norm_act`` and ``torch.ops.fastbn.batch_norm_act_backward``.

``y = relu(bn(x) + residual)`` (ReLU and residual each optional) in fastbn's normalize
pass; the backward masks ``dy`` by ``y > 0`` inside fastbn's two backward passes and
returns the residual's gradient.  Running statistics are returned, not mutated (as
:mod:`fastbn.torch._ops`), and copied into the module's buffers by the caller.  First-order
gradients only: differentiating the backward again raises.
"""

from typing import Optional

import torch
from torch import Tensor

from .._api import batch_norm_backward, batch_norm_forward
from ._ops import _as_fastbn_array, _as_tensor, _batch_norm_fake, _like, _reraise_as_torch
from ._ops_autograd import _add, _stats_vjp


@torch.library.custom_op("fastbn::batch_norm_act", mutates_args=())
def batch_norm_act_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor], residual: Optional[Tensor],
                      training: bool, momentum: float, eps: float, relu: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, save_mean, save_invstd, new_running_mean, new_running_var)`` of
    ``y = relu(bn(x) + residual)`` on the NCHW view of x (CPU tensors; momentum in [0, 1]).

    The new running statistics are empty (0,) tensors unless training with running statistics.
    """
    updates = training and running_mean is not None
    new_mean = running_mean.clone() if updates else None
    new_var = running_var.clone() if updates else None
    stats = (new_mean, new_var) if updates else (None, None) if training else (running_mean, running_var)
    try:
        y, mean, invstd = batch_norm_forward(
            _as_fastbn_array(x), _as_fastbn_array(weight), _as_fastbn_array(bias),
            running_mean=_as_fastbn_array(stats[0]), running_var=_as_fastbn_array(stats[1]),
            training=training, momentum=momentum if updates else 0.0, eps=eps, layout="NCHW",
            activation="relu" if relu else None, residual=_as_fastbn_array(residual))
    except (TypeError, ValueError) as error:
        raise _reraise_as_torch(error) from None
    y = _like(_as_tensor(y, x.device), x)
    mean = _as_tensor(mean, x.device).clone()  # may be the running buffers (eval): no aliasing
    invstd = _as_tensor(invstd, x.device).clone()
    if not updates:
        new_mean, new_var = x.new_empty((0,)), x.new_empty((0,))
    return y, mean, invstd, new_mean, new_var


@batch_norm_act_op.register_fake
def _batch_norm_act_fake(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu):
    # The same outputs as the plain operator's.
    return _batch_norm_fake(x, weight, bias, running_mean, running_var, training, momentum, eps)


@torch.library.custom_op("fastbn::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward_op(dy: Tensor, x: Tensor, y: Tensor, save_mean: Tensor, save_invstd: Tensor,
                               weight: Optional[Tensor], training: bool, relu: bool, residual: bool
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dresidual)``: ``dresidual`` is the masked ``dy`` when
    ``residual``, an empty (0,) tensor otherwise; ``y`` (the forward's output) is read
    only with ``relu``."""
    try:
        grads = batch_norm_backward(
            _as_fastbn_array(dy), _as_fastbn_array(x), _as_fastbn_array(save_mean), _as_fastbn_array(save_invstd),
            _as_fastbn_array(weight), training=training, layout="NCHW", activation="relu" if relu else None,
            y=_as_fastbn_array(y) if relu else None, residual=residual)
    except (TypeError, ValueError) as error:
        raise _reraise_as_torch(error) from None
    dx = _like(_as_tensor(grads[0], x.device), x)
    dresidual = x.new_empty((0,))
    if residual:  # without the ReLU it is dy itself, which an operator must not return
        dresidual = _like(_as_tensor(grads[3], x.device), x)
        dresidual = dresidual if relu else dresidual.clone()
    return dx, _as_tensor(grads[1], x.device).clone(), _as_tensor(grads[2], x.device).clone(), dresidual


@batch_norm_act_backward_op.register_fake
def _batch_norm_act_backward_fake(dy, x, y, save_mean, save_invstd, weight, training, relu, residual):
    channels = x.shape[1]
    dresidual = torch.empty_like(x) if residual else x.new_empty((0,))
    return torch.empty_like(x), x.new_empty((channels,)), x.new_empty((channels,)), dresidual


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, residual, training, _, _, relu = inputs
    y, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, mean, invstd, y)
    # Unused outputs (save_mean, save_invstd: nearly always) get None, not zeros that
    # would cost _stats_vjp several passes over x.
    ctx.set_materialize_grads(False)
    ctx.training, ctx.relu = training, relu
    ctx.has_weight, ctx.has_bias, ctx.has_residual = weight is not None, bias is not None, residual is not None


def _backward(ctx, grad_y, grad_mean, grad_invstd, _grad_new_mean, _grad_new_var):
    x, weight, mean, invstd, y = ctx.saved_tensors
    dx = dweight = dbias = dresidual = None
    if grad_y is not None:
        dx, dweight, dbias, dresidual = torch.ops.fastbn.batch_norm_act_backward(
            grad_y, x, y, mean, invstd, weight, ctx.training, ctx.relu, ctx.has_residual)
    if ctx.training:
        dx = _add(dx, _stats_vjp(x, mean, invstd, grad_mean, grad_invstd))
    return (dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None, None,
            dresidual if ctx.has_residual else None, None, None, None, None)


batch_norm_act_op.register_autograd(_backward, setup_context=_setup_context)

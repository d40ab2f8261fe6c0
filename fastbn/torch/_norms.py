"""Layer, group and instance norm as PyTorch operators and ``torch.nn`` modules on
fastbn kernels (CPU tensors, and CUDA tensors on :mod:`fastbn.cuda.norms`; see
:mod:`fastbn.norms`).  Every operator has a fake kernel, so ``torch.compile(fullgraph=True)``
and ``torch.export`` trace them without graph breaks.

Operators: ``fastbn::layer_norm`` / ``fastbn::layer_norm_backward`` and
``fastbn::group_norm`` / ``fastbn::group_norm_backward`` (instance norm is group norm
with one channel per group, plus functional running statistics: the updated copies are
returned and the module copies them into its buffers, as ``fastbn::batch_norm`` does).
First-order gradients run on fastbn kernels through ``register_autograd``; the backward
operators have no derivative of their own, so double backward raises torch's
"autograd has not been implemented" error.  A ``channels_last`` input runs the
channel-last kernels without a copy and keeps its memory format.
"""

from typing import List, Optional

import torch
from torch import Tensor

from .. import norms
from ._ops import _as_fastbn_array, _as_tensor, _like, _reraise_as_torch, _statistics_dtype


def _channel_last(x):
    """True when ``x`` (N, C, ...) is dense with channels innermost (``channels_last``)."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _to_fastbn(x, last):
    return _as_fastbn_array(x.movedim(1, -1) if last else x)


def _from_fastbn(a, like, last):
    t = _as_tensor(a, like.device)
    return _like(t.movedim(-1, 1) if last else t, like)


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise _reraise_as_torch(error) from None


# --------------------------------------------------------------------------- operators


@torch.library.custom_op("fastbn::layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, invstd)`` of :func:`fastbn.layer_norm_forward`."""
    y, mean, invstd = _call(norms.layer_norm_forward, _as_fastbn_array(x.contiguous()), tuple(normalized_shape),
                            _as_fastbn_array(weight), _as_fastbn_array(bias), eps)
    return _like(_as_tensor(y, x.device), x), _as_tensor(mean, x.device), _as_tensor(invstd, x.device)


@torch.library.custom_op("fastbn::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: Tensor, x: Tensor, normalized_shape: List[int], mean: Tensor, invstd: Tensor,
                           weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`fastbn.layer_norm_backward`."""
    dx, dweight, dbias = _call(norms.layer_norm_backward, _as_fastbn_array(dy.contiguous()),
                               _as_fastbn_array(x.contiguous()), tuple(normalized_shape), _as_fastbn_array(mean),
                               _as_fastbn_array(invstd), _as_fastbn_array(weight))
    return _like(_as_tensor(dx, x.device), x), _as_tensor(dweight, x.device), _as_tensor(dbias, x.device)


@torch.library.custom_op("fastbn::group_norm", mutates_args=())
def group_norm_op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                  eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, invstd, new_running_mean, new_running_var)``; running statistics only
    for instance norm (``num_groups == C``), returned updated (empty (0,) without)."""
    last = _channel_last(x)
    layout = "NHWC" if last else "NCHW"
    xa = _to_fastbn(x if last else x.contiguous(), last)
    if running_mean is None:
        y, mean, invstd = _call(norms.group_norm_forward, xa, num_groups, _as_fastbn_array(weight),
                                _as_fastbn_array(bias), eps, layout=layout)
        new_mean, new_var = x.new_empty((0,)), x.new_empty((0,))
    else:
        new_mean, new_var = running_mean.clone(), running_var.clone()
        y, mean, invstd = _call(norms.instance_norm_forward, xa, _as_fastbn_array(new_mean),
                                _as_fastbn_array(new_var), _as_fastbn_array(weight), _as_fastbn_array(bias),
                                momentum, eps, layout=layout)
    return (_from_fastbn(y, x, last), _as_tensor(mean, x.device), _as_tensor(invstd, x.device), new_mean, new_var)


@torch.library.custom_op("fastbn::group_norm_backward", mutates_args=())
def group_norm_backward_op(dy: Tensor, x: Tensor, num_groups: int, mean: Tensor, invstd: Tensor,
                           weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`fastbn.group_norm_backward`."""
    last = _channel_last(x)
    dx, dweight, dbias = _call(norms.group_norm_backward, _to_fastbn(dy, last),
                               _to_fastbn(x if last else x.contiguous(), last), num_groups,
                               _as_fastbn_array(mean), _as_fastbn_array(invstd), _as_fastbn_array(weight),
                               layout="NHWC" if last else "NCHW")
    return _from_fastbn(dx, x, last), _as_tensor(dweight, x.device), _as_tensor(dbias, x.device)


# Fake kernels: output metadata for torch.compile / torch.export (no data touched).
# Saved statistics are float64 (float32 for float16 CUDA tensors), results have ``torch.empty_like(x)``'s strides (what
# the operators return, see ``_like``), parameter gradients the parameters' shape.

@layer_norm_op.register_fake
def _layer_norm_fake(x, normalized_shape, weight, bias, eps):
    lead = x.shape[:x.dim() - len(normalized_shape)]
    dtype = _statistics_dtype(x)
    return torch.empty_like(x), x.new_empty(lead, dtype=dtype), x.new_empty(lead, dtype=dtype)


@layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(dy, x, normalized_shape, mean, invstd, weight):
    return torch.empty_like(x), x.new_empty(tuple(normalized_shape)), x.new_empty(tuple(normalized_shape))


@group_norm_op.register_fake
def _group_norm_fake(x, num_groups, weight, bias, running_mean, running_var, momentum, eps):
    statistics = (x.shape[0], num_groups)
    if running_mean is None:
        new_mean, new_var = x.new_empty((0,)), x.new_empty((0,))
    else:
        new_mean, new_var = torch.empty_like(running_mean), torch.empty_like(running_var)
    dtype = _statistics_dtype(x)
    return (torch.empty_like(x), x.new_empty(statistics, dtype=dtype), x.new_empty(statistics, dtype=dtype),
            new_mean, new_var)


@group_norm_backward_op.register_fake
def _group_norm_backward_fake(dy, x, num_groups, mean, invstd, weight):
    return torch.empty_like(x), x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))


def _layer_setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.normalized_shape, ctx.has_bias = normalized_shape, bias is not None


def _layer_backward(ctx, grad_y, _grad_mean, _grad_invstd):
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.fastbn.layer_norm_backward(grad_y, x, ctx.normalized_shape, mean, invstd, weight)
    return dx, None, dweight if weight is not None else None, dbias if ctx.has_bias else None, None


def _group_setup(ctx, inputs, output):
    x, num_groups, weight, bias = inputs[:4]
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.num_groups, ctx.has_bias = num_groups, bias is not None


def _group_backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_new_mean, _grad_new_var):
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.fastbn.group_norm_backward(grad_y, x, ctx.num_groups, mean, invstd, weight)
    return (dx, None, dweight if weight is not None else None, dbias if ctx.has_bias else None,
            None, None, None, None)


layer_norm_op.register_autograd(_layer_backward, setup_context=_layer_setup)
group_norm_op.register_autograd(_group_backward, setup_context=_group_setup)


# --------------------------------------------------------------------------- modules


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on fastbn kernels (float32/float64 CPU or CUDA tensors of any rank
    whose trailing dimensions are ``normalized_shape``)."""

    def forward(self, input: Tensor) -> Tensor:
        """Layer-normalize ``input`` over its trailing ``normalized_shape``; shape and dtype kept."""
        shape = tuple(self.normalized_shape)
        folded = input.dim() < 2 or input.dim() > 5
        x = input.reshape((-1,) + shape) if folded else input
        y = torch.ops.fastbn.layer_norm(x, list(shape), self.weight, self.bias, self.eps)[0]
        return y.reshape(input.shape) if folded else y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", backend=fastbn"


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` on fastbn kernels: input (N, C, ...) of rank 2-5,
    contiguous or ``channels_last`` (kept in the output)."""

    def forward(self, input: Tensor) -> Tensor:
        """Group-normalize ``input``; shape, dtype and memory format kept."""
        return torch.ops.fastbn.group_norm(input, self.num_groups, self.weight, self.bias, None, None, 0.0,
                                           self.eps)[0]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", backend=fastbn"


class _FastInstanceNormMixin:
    """``_apply_instance_norm`` of ``torch.nn`` instance norm on fastbn operators: the
    input's statistics through ``fastbn::group_norm`` (G = C, running statistics updated
    as torch does), the running ones through ``fastbn::batch_norm`` in eval."""

    def _apply_instance_norm(self, input):
        if not (self.training or not self.track_running_stats):
            from ._ops import batch_norm
            return batch_norm(input, self.weight, self.bias, self.running_mean, self.running_var, False, 0.0,
                              self.eps)[0]
        update = self.running_mean is not None
        momentum = self.momentum if self.momentum is not None else 0.0
        y, _, _, new_mean, new_var = torch.ops.fastbn.group_norm(
            input, input.shape[1], self.weight, self.bias, self.running_mean if update else None,
            self.running_var if update else None, momentum, self.eps)
        if update:
            with torch.no_grad():
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", backend=fastbn"


class InstanceNorm1d(_FastInstanceNormMixin, torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` on fastbn kernels: input (N, C, L) or (C, L)."""


class InstanceNorm2d(_FastInstanceNormMixin, torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` on fastbn kernels: input (N, C, H, W) or (C, H, W),
    contiguous or ``channels_last``."""


class InstanceNorm3d(_FastInstanceNormMixin, torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` on fastbn kernels: input (N, C, D, H, W) or (C, D, H, W)."""


#: torch.nn class -> fastbn class, for :func:`fastbn.torch.convert`.
NORM_CLASSES = {torch.nn.LayerNorm: LayerNorm, torch.nn.GroupNorm: GroupNorm,
                torch.nn.InstanceNorm1d: InstanceNorm1d, torch.nn.InstanceNorm2d: InstanceNorm2d,
                torch.nn.InstanceNorm3d: InstanceNorm3d}


def convert_norm(module):
    """A fastbn twin of a torch.nn layer/group/instance norm ``module`` sharing its
    parameters and buffers, or None for other modules."""
    cls = NORM_CLASSES.get(type(module))
    if cls is None:
        return None
    converted = cls.__new__(cls)
    converted.__dict__.update(module.__dict__)  # the same Parameters, buffers, hyper-parameters, mode
    converted._parameters = dict(module._parameters)
    converted._buffers = dict(module._buffers)
    converted._modules = dict(module._modules)
    return converted

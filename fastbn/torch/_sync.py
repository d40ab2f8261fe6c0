""":class:`SyncBatchNorm` and :func:`convert_sync_batchnorm`: batch norm whose statistics
span a ``torch.distributed`` process group, on fastbn's synchronized kernels
(:mod:`fastbn.distributed`); see :mod:`fastbn.torch`."""

import torch
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .. import distributed
from . import _ops
from ._ops import _as_fastbn_array, _as_tensor


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = batch_norm(x)`` with the statistics of every rank's batch; differentiable once."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group):
        y, save_mean, save_invstd = distributed.batch_norm_forward(
            _as_fastbn_array(x), _as_fastbn_array(weight), _as_fastbn_array(bias),
            running_mean=_as_fastbn_array(running_mean), running_var=_as_fastbn_array(running_var),
            comm=group, training=True, momentum=momentum, eps=eps, layout="NCHW")
        ctx.save_for_backward(x, weight)
        ctx.save_mean, ctx.save_invstd, ctx.group = save_mean, save_invstd, group
        return _as_tensor(y, x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        # Collective: every rank runs it, also when this rank's x needs no gradient.
        dx, dweight, dbias = distributed.batch_norm_backward(
            _as_fastbn_array(dy), _as_fastbn_array(x),
            ctx.save_mean, ctx.save_invstd, _as_fastbn_array(weight), comm=ctx.group, training=True,
            layout="NCHW")
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (_as_tensor(dx, x.device) if need_x else None,
                _as_tensor(dweight, x.device) if need_weight else None,
                _as_tensor(dbias, x.device) if need_bias else None,
                None, None, None, None, None)


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm`` on fastbn: batch statistics over every rank of a process group.

    Same constructor, attributes and ``state_dict`` as ``torch.nn.SyncBatchNorm``, but a
    subclass of ``torch.nn.modules.batchnorm._BatchNorm`` (not of ``SyncBatchNorm``), so
    ``DistributedDataParallel`` accepts it in a CPU module.  Works on CPU tensors with the
    gloo backend (torch's own raises on the CPU).  Input: (N, C, ...) of rank 2 to 5,
    float32 or float64; ranks may hold different batch sizes, zero included.

    Training with an initialized process group of more than one rank synchronizes (a
    collective: every rank of the group must call forward and backward); eval mode, or
    no initialized process group, behaves like ``BatchNorm`` and does not communicate.
    Statistics and running statistics are bitwise identical on every rank.  The weight
    and bias gradients are this rank's contributions: DDP's gradient averaging sums
    them, as with ``torch.nn.SyncBatchNorm``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group(self):
        """The process group to synchronize over, or None when there is nothing to sync."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        update_running = self.training and self.track_running_stats and self.num_batches_tracked is not None
        momentum = 0.0 if self.momentum is None else self.momentum
        if update_running and self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked + 1)  # cumulative moving average
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_running else None
        running_var = self.running_var if pass_running else None
        # As torch.nn.SyncBatchNorm: only training mode synchronizes.
        group = self._group() if (use_batch_stats and self.training) else None
        if group is None:
            y, _, _ = _ops.batch_norm(input, self.weight, self.bias, running_mean, running_var,
                                      use_batch_stats, momentum, self.eps)
        else:
            y = _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                             momentum, self.eps, group)
        if update_running:
            self.num_batches_tracked.add_(1)
        return y


def convert_sync_batchnorm(module, process_group=None):
    """Replace every batch-norm module (``torch.nn.BatchNorm1d/2d/3d``, fastbn's
    ``BatchNorm*d``, ``torch.nn.SyncBatchNorm``) in ``module`` by :class:`SyncBatchNorm`.

    As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new modules share the old
    ones' parameters and buffers and training mode; ``module`` is modified in place and
    returned (or its replacement, when it is itself a batch-norm module).
    """
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted

"""The torch.nn batch-norm modules on fastbn kernels and :func:`convert`; see :mod:`fastbn.torch`."""

import torch

from . import _ops


class _FastBatchNormMixin:
    """``forward`` of ``torch.nn.modules.batchnorm._BatchNorm``, computed by fastbn.

    The mode logic is PyTorch's, with one difference: ``num_batches_tracked`` is
    incremented after the kernels succeed, so a call that raises changes no state.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Batch-normalize ``input`` ((N, C, ...) float32/float64 tensor, CPU or CUDA).

        Returns a tensor shaped like ``input`` in its dtype and memory format.
        """
        self._check_input_dim(input)
        update_running = self.training and self.track_running_stats and self.num_batches_tracked is not None
        momentum = 0.0 if self.momentum is None else self.momentum
        if update_running and self.momentum is None:
            # Cumulative moving average over the batches seen, this one included.
            momentum = 1.0 / float(self.num_batches_tracked + 1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        y, _, _ = _ops.batch_norm(
            input, self.weight, self.bias,
            self.running_mean if pass_running else None,
            self.running_var if pass_running else None,
            use_batch_stats, momentum, self.eps)
        if update_running:
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_FastBatchNormMixin, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_FastBatchNormMixin, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn kernels: input (N, C, H, W), contiguous or
    ``channels_last`` (kept in the output)."""


class BatchNorm3d(_FastBatchNormMixin, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn kernels: input (N, C, D, H, W), contiguous or
    ``channels_last_3d`` (kept in the output)."""


_FASTBN_CLASS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by its fastbn class.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new modules share the
    old ones' parameter and buffer tensors (so optimizers holding the parameters keep
    working) and training mode; hooks registered on the old modules are not carried
    over.  Only modules whose type is exactly one of the three torch classes are
    replaced (subclasses may compute something else).

    Parameters
    ----------
    module : torch.nn.Module, modified in place.

    Returns
    -------
    The converted module: ``module`` itself, or the replacement when ``module`` is
    itself a batch-norm module.
    """
    fastbn_class = _FASTBN_CLASS.get(type(module))
    converted = module
    if fastbn_class is not None:
        converted = fastbn_class(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        # Share, not copy: the same Parameter objects stay registered with optimizers.
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert(child))
    return converted

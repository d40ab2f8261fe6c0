"""``BatchNormAct1d/2d/3d``: batch norm with a fused residual add and ReLU; see :mod:`fastbn.torch`."""

import torch

from ._act_ops import batch_norm_act_op
from ._batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

ACTIVATIONS = (None, "relu")


class _BatchNormActMixin:
    """``relu(bn(x) + residual)`` in fastbn's normalize pass (and its backward in fastbn's
    two backward passes), with the batch-norm module's parameters, buffers, modes and
    ``state_dict`` keys (those of ``torch.nn.BatchNorm*d``).

    ``activation``: ``"relu"`` or None (batch norm plus the residual add only).
    CPU float32/float64 inputs run fused; other inputs (CUDA, 16-bit, empty batches)
    run the batch-norm module followed by torch's add and ReLU.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="relu", device=None, dtype=None):
        if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
            raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected None or a number in [0, 1], got {momentum!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input: torch.Tensor, residual: torch.Tensor = None) -> torch.Tensor:
        """``relu(bn(input) + residual)``: input (N, C, ...) like the batch-norm module's;
        residual None or a tensor of input's shape and dtype (it may be ``input``).
        Returns a tensor like ``input``."""
        relu = self.activation == "relu"
        fused = input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64) and input.numel() > 0
        if not fused:
            y = super().forward(input)
            if residual is not None:
                y = y + residual
            return torch.relu(y) if relu else y
        self._check_input_dim(input)
        self._check_channels(input)
        update_running = self.training and self.track_running_stats
        momentum = 0.0
        if update_running:
            # None: cumulative moving average over the batches seen, this one included.
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        running_mean, running_var = (self.running_mean, self.running_var) if pass_running else (None, None)
        y, _, _, new_mean, new_var = batch_norm_act_op(input, self.weight, self.bias, running_mean, running_var,
                                                       residual, use_batch_stats, momentum, self.eps, relu)
        if use_batch_stats and running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        if update_running and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"


class BatchNormAct1d(_BatchNormActMixin, BatchNorm1d):
    """``relu(BatchNorm1d(x) + residual)`` fused: input (N, C) or (N, C, L)."""


class BatchNormAct2d(_BatchNormActMixin, BatchNorm2d):
    """``relu(BatchNorm2d(x) + residual)`` fused: input (N, C, H, W), contiguous or
    ``channels_last`` (kept in the output)."""


class BatchNormAct3d(_BatchNormActMixin, BatchNorm3d):
    """``relu(BatchNorm3d(x) + residual)`` fused: input (N, C, D, H, W)."""

"""The torch.nn batch-norm modules on fastbn kernels and :func:`convert`; see :mod:`fastbn.torch`."""

import torch

from . import _norms, _ops


def _as_parameter_dtype(vectors, dtype):
    """Per-channel tensors (weight, bias, running statistics) in ``dtype``: themselves
    when they have it, else differentiable (C,) copies.  A module converted whole to a
    16-bit dtype (``model.half()``) has 16-bit parameters, which fastbn takes in float32
    with 16-bit input (as torch's mixed-precision batch norm computes them)."""
    return tuple(v if v is None or v.dtype == dtype else v.to(dtype) for v in vectors)


def _registered(module, registry, names):
    """``module``'s attributes ``names``, read from ``registry`` (its ``_parameters`` or
    ``_buffers``) where registered there: ``Module.__getattr__`` costs ~1 us an attribute,
    eight of them a call.  A name not registered (a parametrized or weight-normed
    ``weight``, say) is read as an attribute."""
    return tuple(registry[name] if name in registry else getattr(module, name) for name in names)


class _FastBatchNormMixin:
    """``forward`` of ``torch.nn.modules.batchnorm._BatchNorm``, computed by fastbn.

    The mode logic is PyTorch's, with one difference: ``num_batches_tracked`` is
    incremented after the kernels succeed, so a call that raises changes no state.
    Errors for bad input are instances of the class torch raises (RuntimeError for a
    wrong channel count or dtype, ValueError for a wrong rank or a one-value batch),
    with fastbn's messages; see :class:`fastbn.torch._ops.FastbnValueError`.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Batch-normalize ``input`` ((N, C, ...) float32/float64 tensor, CPU or CUDA, or
        float16/bfloat16 (CPU; float16 on CUDA) with float32 or 16-bit parameters).

        Returns a tensor shaped like ``input`` in its dtype and memory format.  An empty
        input (N = 0) gives an empty output and leaves the running statistics as they
        are, as torch does (``num_batches_tracked`` still counts the call, as in torch).
        """
        self._check_input_dim(input)
        running_mean, running_var, batches_tracked = _registered(
            self, self._buffers, ("running_mean", "running_var", "num_batches_tracked"))
        update_running = self.training and self.track_running_stats
        # momentum is used only when running statistics are updated; torch neither
        # validates nor uses it otherwise.
        momentum, batches = 0.0, None
        if update_running:
            if self.momentum is not None:
                momentum = self.momentum
            elif batches_tracked is not None:
                # Cumulative moving average over the batches seen, this one included.
                momentum, batches = None, batches_tracked + 1
        if input.numel() == 0:
            y = self._empty_batch(input)
        else:
            self._check_channels(input)
            use_batch_stats = self.training or (running_mean is None and running_var is None)
            pass_running = not self.training or self.track_running_stats
            running = (running_mean, running_var) if pass_running else (None, None)
            vectors = _registered(self, self._parameters, ("weight", "bias")) + running
            half = input.dtype in _ops.HALF_DTYPES
            if half:
                vectors = _as_parameter_dtype(vectors, _ops.parameter_dtype(input))
            y, _, _ = _ops.batch_norm(input, *vectors, use_batch_stats, momentum, self.eps, batches)
            if half:
                with torch.no_grad():  # 16-bit running statistics were updated as float32 copies
                    for buffer, updated in zip(running, vectors[2:]):
                        if buffer is not None and updated is not buffer:
                            buffer.copy_(updated)
        if update_running and batches_tracked is not None:
            batches_tracked.add_(1)
        return y

    def _empty_batch(self, input):
        """torch's result for an empty input: a fresh empty tensor still connected to
        weight and bias in the graph (their gradients are zeros, not None)."""
        out = input.clone()
        if self.weight is not None:
            out = out * self.weight[0]
        if self.bias is not None:
            out = out + self.bias[0]
        return out

    def _check_channels(self, input):
        """A wrong channel count is torch's RuntimeError, worded about the input."""
        if input.dim() >= 2 and input.shape[1] != self.num_features:
            raise _ops.FastbnValueError(
                f"input: expected {self.num_features} channels (dimension 1) for "
                f"{type(self).__name__}({self.num_features}), got input of shape {tuple(input.shape)}")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", backend=fastbn"


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
    """Replace every ``torch.nn.BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm`` and
    ``InstanceNorm1d/2d/3d`` in ``module`` by its fastbn class.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new modules share the
    old ones' parameter and buffer tensors (so optimizers holding the parameters keep
    working) and training mode; hooks registered on the old modules are not carried
    over (the layer/group/instance norm twins keep the old module's attributes, hooks
    included).  Only modules whose type is exactly one of these torch classes are
    replaced (subclasses may compute something else).

    ``torch.nn.SyncBatchNorm`` modules are left as they are (not converted; they need
    a process group, which these classes do not use).  Lazy modules
    (``torch.nn.LazyBatchNorm*d``) must be materialized first, by one forward pass:
    they then are ``torch.nn.BatchNorm*d`` and are converted; an unmaterialized one is
    a ValueError.

    Parameters
    ----------
    module : torch.nn.Module, modified in place.

    Returns
    -------
    The converted module: ``module`` itself, or the replacement when ``module`` is
    itself a batch-norm module.
    """
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"fastbn.torch.convert: {type(module).__name__} has not been materialized; run one "
            "forward pass through the model first (it then becomes a BatchNorm*d and is converted)")
    fastbn_class = _FASTBN_CLASS.get(type(module))
    converted = _norms.convert_norm(module)
    if converted is None:
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

"""PyTorch modules whose batch norm runs on fastbn kernels (optional: needs ``torch``).

- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: subclasses of the
  ``torch.nn`` classes with the same constructor, attributes and ``state_dict``; only the
  forward and backward computations are replaced;
- :func:`convert`: swaps every ``torch.nn.BatchNorm1d/2d/3d`` in a model for these;
- :class:`BatchNormAct1d`, :class:`BatchNormAct2d`, :class:`BatchNormAct3d`:
  ``relu(bn(x) + residual)`` with the add and ReLU fused into fastbn's passes;
  :func:`fuse` rewrites BatchNorm -> [add ->] ReLU chains of a model into them, and
  :func:`fold` folds eval batch norms into the preceding Conv/Linear (``torch.fx``);
- :class:`SyncBatchNorm`, :func:`convert_sync_batchnorm`: batch statistics over every rank
  of a ``torch.distributed`` process group (CPU tensors with gloo too), see
  :mod:`fastbn.distributed`.

Data path.  CPU tensors are handed to fastbn as NumPy views (``tensor.detach().numpy()``,
no copy; running statistics are updated in place through them) and results come back
through ``torch.from_numpy`` (no copy).  A ``channels_last`` (or ``channels_last_3d``)
tensor is, seen as NCHW, a channel-last array: fastbn runs its NHWC kernels on it
without a copy and returns ``y`` and ``dx`` in the same memory format.  CUDA tensors go
to fastbn's CUDA backend as numba device-array views (``__cuda_array_interface__``, no
copy); results come back as torch tensors on the same device (``torch.as_tensor``).
Other devices raise TypeError.  Supported dtypes are fastbn's: float32, float64 and
float16, and bfloat16 on the CPU (others raise TypeError).  16-bit tensors go to the
kernels as 16-bit NumPy views, no copy (float16 as ``numpy.float16``, bfloat16 as
``ml_dtypes.bfloat16`` through its ``int16`` view: bfloat16 CPU tensors need
``ml_dtypes`` installed), and are computed in float32 with float32 statistics, as
torch's mixed-precision batch norm: float32 weight, bias and running statistics with
16-bit input (what CPU ``torch.autocast(device_type="cpu", dtype=torch.bfloat16)``
gives a model), or 16-bit ones (``model.half()``/``model.bfloat16()``), which the
modules pass as float32 copies (C values each).  ``y`` and ``dx`` are 16-bit, rounded
once from float32; ``dweight`` and ``dbias`` are float32 from the operators.

Operators and derivatives.  Forward and backward are PyTorch operators,
``torch.ops.fastbn.batch_norm`` and ``torch.ops.fastbn.batch_norm_backward``, both run
on fastbn kernels.  The backward is differentiable: its own derivative (double
backward, Hessian-vector products, gradient penalties) and the gradient through the
saved batch statistics are computed with torch ops, as is the forward-mode (jvp)
formula, forward-over-reverse included; see :mod:`fastbn.torch._ops_autograd`.

This is the only part of fastbn that imports torch; ``import fastbn`` never does.
"""

from ._act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ._batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from ._fuse import fold, fuse
from ._sync import SyncBatchNorm, convert_sync_batchnorm
from ._norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert", "convert_sync_batchnorm",
           "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm",
           "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "fuse", "fold"]

# Public path in reprs and pickles (torch.save of a whole model), not the private module.
for _public in (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, convert, convert_sync_batchnorm,
                GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm,
                BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, fuse, fold):
    _public.__module__ = __name__
del _public

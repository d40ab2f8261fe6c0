"""fastbn: fast, accurate batch-normalization kernels (Numba, CPU and CUDA).

Public functions (PyTorch ``F.batch_norm`` conventions):

- :func:`batch_norm` — ``torch.nn.functional.batch_norm``'s argument order
  (``x, running_mean, running_var, weight, bias, ...``), returns ``y``;
- :func:`batch_norm_forward` — ``x, weight, bias`` positional (ATen
  ``native_batch_norm``'s order), running statistics keyword-only; returns
  ``(y, save_mean, save_invstd)``;
- :func:`batch_norm_backward` — returns ``(dx, dweight, dbias)``;
- :func:`batch_stats` — per-channel ``(mean, var)`` in one pass.

:mod:`fastbn.reference` holds the float64 NumPy implementation they are tested against.
"""

from . import reference
from ._api import batch_norm, batch_norm_backward, batch_norm_forward, batch_stats
from .layers import BatchNorm

__version__ = "0.1.0"

__all__ = ["BatchNorm", "batch_norm", "batch_norm_forward", "batch_norm_backward", "batch_stats", "reference"]

"""fastbn: fast, accurate batch-normalization kernels (Numba, CPU and CUDA).

Public functions:

- :func:`batch_norm` — ``torch.nn.functional.batch_norm``'s argument order
  (``x, running_mean, running_var, weight, bias, ...``), returns ``y``;
- :func:`batch_norm_forward` — ``x, weight, bias`` positional (ATen
  ``native_batch_norm``'s order), running statistics keyword-only; returns
  ``(y, save_mean, save_invstd)``;
- :func:`batch_norm_backward` — returns ``(dx, dweight, dbias)``;
- :func:`batch_stats` — per-channel ``(mean, var)`` in one pass;
- :func:`moments`, :class:`Moments`, :func:`stream_moments` — mergeable per-channel
  statistics (one pass per array, merged across chunks, datasets or processes);
- :mod:`fastbn.stages` — the pipeline's stages the functions above are built from.

:mod:`fastbn.reference` holds the float64 NumPy implementation they are tested against.
"""

from . import reference, stages
from ._api import batch_norm, batch_norm_backward, batch_norm_forward, batch_stats
from .layers import BatchNorm
from .stages import moments
from .stats import BackwardSums, Moments, stream_moments

from ._version import __version__

__all__ = ["BatchNorm", "BackwardSums", "Moments", "batch_norm", "batch_norm_forward", "batch_norm_backward",
           "batch_stats", "moments", "reference", "stages", "stream_moments"]

from .norms import (group_norm, group_norm_backward, group_norm_forward, instance_norm, layer_norm,  # noqa: E402
                    layer_norm_backward, layer_norm_forward)

__all__ += ["group_norm", "group_norm_backward", "group_norm_forward", "instance_norm", "layer_norm",
            "layer_norm_backward", "layer_norm_forward"]

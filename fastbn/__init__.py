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

Every public name is loaded on first use (PEP 562): ``import fastbn`` reads no
submodule, and a process that only calls :func:`batch_norm_forward` never imports the
layers, the other norms, the reference or the distributed wrappers.
"""

import importlib

from . import _version

__version__ = _version.__version__

#: Public name -> the submodule defining it, imported on first access.
_PUBLIC = {
    "batch_norm": "_api", "batch_norm_backward": "_api", "batch_norm_forward": "_api", "batch_stats": "_api",
    "BatchNorm": "layers",
    "moments": "stages",
    "BackwardSums": "stats", "Moments": "stats", "stream_moments": "stats",
    "group_norm": "norms", "group_norm_backward": "norms", "group_norm_forward": "norms",
    "instance_norm": "norms", "layer_norm": "norms", "layer_norm_backward": "norms", "layer_norm_forward": "norms",
}

#: Submodules reachable as attributes of ``fastbn`` without importing them first (those an
#: eager ``import fastbn`` used to load).  ``fastbn.torch``, ``fastbn.cuda`` and the
#: benchmarks are not among them: they need ``import fastbn.torch`` etc., as before.
_SUBMODULES = frozenset({
    "reference", "stages", "_api", "_checks", "_dispatch", "_epilogue", "algebra", "coefficients", "cpu",
    "distributed", "dtypes", "geometry", "ghost", "half", "layers", "norms", "reference_norms", "stats",
})

__all__ = ["BatchNorm", "BackwardSums", "Moments", "batch_norm", "batch_norm_forward", "batch_norm_backward",
           "batch_stats", "moments", "reference", "stages", "stream_moments",
           "group_norm", "group_norm_backward", "group_norm_forward", "instance_norm", "layer_norm",
           "layer_norm_backward", "layer_norm_forward"]


def __getattr__(name):
    """Import the submodule behind public name (or submodule) ``name`` on first access."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | _SUBMODULES)

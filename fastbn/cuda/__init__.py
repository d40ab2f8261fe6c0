"""CUDA backend: ``numba.cuda`` kernels per kernel family (:mod:`~fastbn.cuda.planes`,
:mod:`~fastbn.cuda.rows`), the block merges (:mod:`~fastbn.cuda.merge`), the per-channel
kernels (:mod:`~fastbn.cuda.channels`) and the pipeline's stages that launch them
(:mod:`~fastbn.cuda.stages`, the same functions as :mod:`fastbn.cpu`).

Used by the public functions of :mod:`fastbn` when they are given device arrays (numba
device arrays, CuPy arrays, PyTorch CUDA tensors: anything exposing
``__cuda_array_interface__``).  Imported lazily, on the first device array, so
``import fastbn`` needs no GPU.  Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)
the same kernels run on the CPU, for testing.

Every launch goes to the caller's stream (torch's or CuPy's current stream; for numba
arrays the one set by :func:`stream`, else numba's default stream) on the device the
data lives on, and no call waits on the host (:mod:`~fastbn.cuda.streams`).
"""

from numba import cuda as _cuda

from .arrays import SIMULATOR
from .config import LaunchConfig, launch_config
from .fused import backward as fused_backward
from .fused import forward as fused_forward
from .streams import stream
from .stages import (apply, as_dense, backward_apply, backward_coefficients, backward_scale, backward_sums,
                     forward_coefficients, geometry, mean_var, merge_moments, merge_sums, moments, moments_invstd,
                     moments_var, parameter_gradients, relu_mask)

if SIMULATOR:
    from . import _simulator
    _simulator.install()

__all__ = ["apply", "as_dense", "backward_apply", "backward_coefficients", "backward_scale", "backward_sums",
           "forward_coefficients", "geometry", "mean_var", "merge_moments", "merge_sums", "moments", "moments_invstd",
           "moments_var", "parameter_gradients", "relu_mask", "fused_forward", "fused_backward", "launch_config", "stream",
           "LaunchConfig", "describe", "require_gpu"]


def describe():
    """One line describing the GPU the backend would use, or None when there is none.

    E.g. ``"NVIDIA H100 80GB HBM3 (compute capability 9.0, 79.1 GiB)"``; under the
    simulator ``"Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"``.  Never raises.
    """
    if SIMULATOR:
        return "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    try:
        if not _cuda.is_available():
            return None
        device = _cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        major, minor = device.compute_capability
        total_bytes = _cuda.current_context().get_memory_info().total
        return f"{name} (compute capability {major}.{minor}, {total_bytes / 2**30:.1f} GiB)"
    except Exception:  # a broken driver install must not break `python -m fastbn`
        return None


def require_gpu():
    """Raise RuntimeError unless numba.cuda can run kernels here (a GPU or the simulator)."""
    if SIMULATOR or _cuda.is_available():
        return
    raise RuntimeError(
        "fastbn: got CUDA device arrays but numba.cuda cannot use a GPU in this process "
        "(no CUDA driver or device found; see `numba -s` for numba's CUDA diagnostics)")

"""CUDA backend: ``numba.cuda`` kernels per memory layout and their host driver.

The GPU twin of :mod:`fastbn.cpu`, used by the public functions of :mod:`fastbn` when
they are given device arrays (numba device arrays, CuPy arrays, PyTorch CUDA tensors:
anything exposing ``__cuda_array_interface__``).  Imported lazily, on the first device
array, so ``import fastbn`` needs no GPU.  Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same kernels run on the CPU, for testing.
"""

from numba import cuda as _cuda

from .arrays import SIMULATOR
from .config import LaunchConfig, launch_config
from .driver import batch_norm_backward, batch_norm_forward, batch_stats
from .dtypes import FLOAT_DTYPES, STAT_DTYPES

if SIMULATOR:
    from . import _simulator
    _simulator.install()

__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_backward", "launch_config",
           "LaunchConfig", "FLOAT_DTYPES", "STAT_DTYPES", "describe", "require_gpu"]


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

"""Where the data lives decides the backend: NumPy arrays run :mod:`fastbn.cpu`, CUDA
device arrays run :mod:`fastbn.cuda` (imported only then)."""

import sys

import numpy as np

from . import cpu as _cpu
from . import dtypes


def is_device_array(a):
    """True for anything exposing ``__cuda_array_interface__`` (CuPy, PyTorch CUDA, numba)
    and for numba device arrays, recognised as numba does (under numba's CUDA simulator
    they expose no interface).  A numba device array cannot exist before ``numba.cuda``
    is imported, so a host-only process never imports it here."""
    if hasattr(a, "__cuda_array_interface__"):
        return True
    numba_cuda = sys.modules.get("numba.cuda")
    devicearray = getattr(numba_cuda, "devicearray", None)
    return devicearray is not None and bool(devicearray.is_cuda_ndarray(a))


class Backend:
    """A backend module and the dtypes it accepts (from :mod:`fastbn.dtypes`)."""

    def __init__(self, module, name):
        self.module = module
        self.name = name
        self.storage_dtypes = dtypes.storage_dtypes(name)
        self.statistics_dtypes = dtypes.statistics_dtypes(name)


_CPU = Backend(_cpu, "cpu")
_CUDA = None


def _cuda_backend():
    global _CUDA
    if _CUDA is None:
        from . import cuda  # lazy: only processes that pass device arrays need it
        _CUDA = Backend(cuda, "cuda")
    _CUDA.module.require_gpu()
    return _CUDA


def select_backend(arrays):
    """The :class:`Backend` for the named arrays (a dict name -> array or None).

    All non-None arrays must live on the same side, host (NumPy) or device (CUDA); the
    first one decides and any other is a TypeError naming it.  Host values must be
    numpy.ndarray.  Device arrays select the CUDA backend (a RuntimeError when numba.cuda
    has no GPU).
    """
    if all(a is None or type(a) is np.ndarray for a in arrays.values()):
        return _CPU  # the common case, decided without the device checks below
    given = [(name, a) for name, a in arrays.items() if a is not None]
    on_device = [is_device_array(a) for _, a in given]
    for (name, a), device in zip(given, on_device):
        if device != on_device[0]:
            expected = "a CUDA device array" if on_device[0] else "a numpy.ndarray"
            raise TypeError(f"{name}: expected {expected} like {given[0][0]} (host and device "
                            f"arrays cannot be mixed in one call), got {type(a).__name__}")
    if any(on_device):
        return _cuda_backend()
    for name, a in given:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray or a CUDA device array, got {type(a).__name__} (for CPU torch tensors use the fastbn.torch modules, or pass tensor.numpy())")
    return _CPU

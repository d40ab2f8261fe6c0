"""Device arrays at the backend's boundary: recognising them, low-level views of their
memory, and handing results back as the caller's kind of array.

Callers may pass numba device arrays or anything exposing
``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors).  Inputs become
zero-copy numba views (:func:`as_numba`); results, always numba device arrays, go
back through :func:`like_caller` as a CuPy array for CuPy input, a torch tensor for
torch input, zero-copy.  Under Numba's CUDA simulator device arrays wrap NumPy arrays
and expose no ``__cuda_array_interface__``; the two functions that build views on raw
memory (:func:`strided_view`, :func:`data_pointer`) have a simulator branch, the rest
is one code path.
"""

import numba
import numpy as np
from numba import cuda

#: True under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
SIMULATOR = bool(numba.config.ENABLE_CUDASIM)


def as_numba(a):
    """``a`` as a numba device array sharing its memory (None passes through)."""
    if a is None or cuda.devicearray.is_cuda_ndarray(a):
        return a
    return cuda.as_cuda_array(a)


def like_caller(result, caller):
    """The numba device array ``result`` as the kind of array ``caller`` is, zero-copy."""
    package = type(caller).__module__.partition(".")[0]
    if package == "cupy":
        import cupy
        return cupy.asarray(result)
    if package == "torch":
        import torch
        return torch.as_tensor(result, device=caller.device)
    return result


def strided_view(base, shape, strides):
    """A view of ``base``'s memory, from its first element, with ``shape`` and byte ``strides``."""
    if SIMULATOR:
        return cuda.devicearray.FakeCUDAArray(np.lib.stride_tricks.as_strided(base._ary, shape, strides))
    return cuda.devicearray.DeviceNDArray(tuple(shape), tuple(strides), base.dtype, gpu_data=base.gpu_data)


def data_pointer(a):
    """Address of the first element of device array ``a``."""
    interface = a.__array_interface__ if SIMULATOR else a.__cuda_array_interface__
    return interface["data"][0]


def flat(a):
    """The 1-D view, in memory order, of an array dense in some axis order."""
    return strided_view(a, (a.size,), (a.dtype.itemsize,))


def new_flat(size, dtype):
    """An uninitialized 1-D device array."""
    return cuda.device_array(size, dtype=dtype)


def overlaps(a, b):
    """True when dense arrays ``a`` and ``b`` share any byte."""
    a_lo, b_lo = data_pointer(a), data_pointer(b)
    return a_lo < b_lo + b.size * b.dtype.itemsize and b_lo < a_lo + a.size * a.dtype.itemsize

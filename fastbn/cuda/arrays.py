"""Device arrays at the backend's boundary: recognising them, low-level views of their
memory, and allocating results as the caller's kind of array.

Callers may pass numba device arrays or anything exposing
``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors).  Inputs become
zero-copy numba views (:func:`as_numba`); results are allocated by the caller's library
(:func:`empty`: torch for torch input, CuPy for CuPy, numba otherwise) and the kernels
write them through numba views.  Under Numba's CUDA simulator device arrays wrap NumPy arrays
and expose no ``__cuda_array_interface__``; the two functions that build views on raw
memory (:func:`strided_view`, :func:`data_pointer`) have a simulator branch, the rest
is one code path.

16-bit storage.  float16 arrays reach the kernels as numba's native float16; bfloat16
ones (``torch.bfloat16`` tensors, numba or CuPy arrays of ``ml_dtypes.bfloat16``) as
their ``int16`` view, the kernel view :mod:`fastbn.half` converts from
(:func:`kernel_view`).  Inside the backend an ``int16`` array therefore always holds
bfloat16 storage (:func:`storage_dtype`): no other data is ever int16, so results are
allocated as bfloat16 for it (:func:`empty`).  A caller's own int16 array is never
taken for bfloat16: the public checks refuse int16 before anything gets here.
"""

import numba
import numpy as np
from numba import cuda

from .. import dtypes

#: True under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
SIMULATOR = bool(numba.config.ENABLE_CUDASIM)


def package_of(a):
    """The top-level package of ``a``'s type: "torch", "cupy", "numba", ..."""
    return type(a).__module__.partition(".")[0]


#: The kernel view of bfloat16 storage (:data:`fastbn.half.VIEW_DTYPES`; float16 stays
#: native on CUDA).
BFLOAT16_VIEW = np.dtype(np.int16)


def kernel_view(a):
    """Numba array ``a`` as the kernels index it: bfloat16 storage (an ``ml_dtypes``
    dtype, or the opaque 2-byte items other libraries export it as) as its int16 view,
    anything else unchanged."""
    dtype = a.dtype
    if dtype.kind == "V" and dtype.itemsize == 2:  # ml_dtypes.bfloat16's kind is "V" too
        return a.view(BFLOAT16_VIEW)
    return a


def storage_dtype(dtype):
    """The storage dtype kernel-view ``dtype`` holds: bfloat16 for int16, else itself."""
    dtype = np.dtype(dtype)
    return dtypes.numpy_dtype("bfloat16") if dtype == BFLOAT16_VIEW else dtype


def policy_of(dtype):
    """The :class:`fastbn.dtypes.DtypePolicy` of a storage or kernel-view ``dtype``."""
    return dtypes.policy(storage_dtype(dtype))


def as_numba(a):
    """``a`` as the numba device array the kernels take, sharing its memory (None passes
    through): its :func:`kernel_view`.

    ``sync=False``: the interface's stream is the caller's, which fastbn launches on
    anyway (:mod:`fastbn.cuda.streams`), so waiting for it on the host is never needed."""
    if a is None:
        return a
    if not cuda.devicearray.is_cuda_ndarray(a):
        if package_of(a) == "torch" and str(a.dtype) == "torch.bfloat16":
            import torch  # already imported: ``a`` is a tensor
            a = a.view(torch.int16)
        a = cuda.as_cuda_array(a, sync=False)
    return kernel_view(a)


_TORCH_DTYPES = {}


def _torch_dtype(torch, dtype):
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                              "float64": torch.float64})
    return _TORCH_DTYPES[np.dtype(dtype).name]


def empty(caller, shape, dtype, strides=None, stream=0):
    """An uninitialized device array of ``caller``'s kind (torch, CuPy, else numba) on
    its device, from that library's allocator (torch's and CuPy's pools are stream-ordered
    and free of per-call ``cuMemAlloc``); ``strides`` in bytes (default C order).
    ``dtype`` is a storage or kernel-view dtype (int16: a bfloat16 array)."""
    shape = tuple(shape)
    dtype = storage_dtype(dtype)
    if strides is None:
        strides, step = [], dtype.itemsize
        for extent in reversed(shape):
            strides.insert(0, step)
            step *= max(extent, 1)
    package = package_of(caller)
    if package == "torch":
        import torch
        return torch.empty_strided(shape, tuple(s // dtype.itemsize for s in strides),
                                   dtype=_torch_dtype(torch, dtype), device=caller.device)
    if package == "cupy":
        import cupy
        with cupy.cuda.Device(caller.device.id):
            size = 1
            for extent in shape:
                size *= extent
            return cupy.ndarray(shape, dtype, memptr=cupy.cuda.alloc(size * dtype.itemsize), strides=tuple(strides))
    size = 1
    for extent in shape:
        size *= extent
    return strided_view(cuda.device_array(size, dtype=dtype, stream=stream), shape, tuple(strides))


def strided_view(base, shape, strides):
    """A view of ``base``'s memory, from its first element, with ``shape`` and byte ``strides``."""
    if SIMULATOR:
        return cuda.devicearray.FakeCUDAArray(np.lib.stride_tricks.as_strided(base._ary, shape, strides))
    return cuda.devicearray.DeviceNDArray(tuple(shape), tuple(strides), base.dtype, gpu_data=base.gpu_data)


def word_view(a, head):
    """The ``uint32`` words of flat 16-bit array ``a`` from element ``head``: word ``k``
    holds elements ``head + 2k`` (low half) and ``head + 2k + 1``; an odd last element
    is left out.  ``a``'s element ``head`` must start at a 4-byte boundary."""
    start = a[head:]
    words = (a.size - head) // 2
    if SIMULATOR:
        return cuda.devicearray.FakeCUDAArray(start._ary[:2 * words].view(np.uint32))
    return cuda.devicearray.DeviceNDArray((words,), (4,), np.dtype(np.uint32), gpu_data=start.gpu_data)


def data_pointer(a):
    """Address of the first element of device array ``a``."""
    interface = a.__array_interface__ if SIMULATOR else a.__cuda_array_interface__
    return interface["data"][0]


def flat(a):
    """The 1-D view, in memory order, of an array dense in some axis order."""
    return strided_view(a, (a.size,), (a.dtype.itemsize,))


def overlaps(a, b):
    """True when dense arrays ``a`` and ``b`` share any byte."""
    a_lo, b_lo = data_pointer(a), data_pointer(b)
    return a_lo < b_lo + b.size * b.dtype.itemsize and b_lo < a_lo + a.size * a.dtype.itemsize

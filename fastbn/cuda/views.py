"""Device arrays as the kernels see them, from a :class:`fastbn.geometry.Geometry`.

Every kernel takes the flat buffer of an array dense in the geometry's axis order
(``axes``, outermost first).  Outputs are allocated in that order and handed back with
the input's logical shape, so a ``channels_last`` input gives a ``channels_last`` result.
"""

import math

from ..geometry import dense_strides, is_dense_in
from .arrays import as_numba, data_pointer, flat, like_caller, new_flat, overlaps, strided_view


def is_dense(a, geometry):
    """True when numba array ``a``'s bytes are dense in the kernels' order."""
    return is_dense_in(a.shape, a.strides, a.dtype.itemsize, geometry.axes)


def logical_view(buffer, geometry):
    """The flat kernel-order ``buffer`` seen with the logical shape."""
    shape = geometry.shape
    return strided_view(buffer, shape, dense_strides(shape, buffer.dtype.itemsize, geometry.axes))


def kernel_input(a, geometry):
    """Numba array ``a`` (logical shape) as the flat kernel-order buffer; copied if not dense."""
    if is_dense(a, geometry):
        return flat(a)
    buffer = new_flat(a.size, a.dtype)
    logical_view(buffer, geometry)[...] = a
    return buffer


def as_dense(x, geometry):
    """``x`` itself when its bytes are dense in the kernels' order, else such a copy
    (logical shape, the caller's kind of array), so that later views of it are free."""
    a = as_numba(x)
    if is_dense(a, geometry):
        return x
    return like_caller(logical_view(kernel_input(a, geometry), geometry), x)


def output_target(out, inputs, geometry, dtype):
    """Flat buffer an elementwise kernel writes: ``out`` (a numba array or None) itself
    when it is dense in kernel order and is either exactly an input (elementwise kernels
    read and write the same index) or disjoint from all of them; else a fresh buffer."""
    if out is not None and is_dense(out, geometry):
        target = flat(out)
        if all(data_pointer(target) == data_pointer(a) or not overlaps(target, a) for a in inputs):
            return target
    return new_flat(math.prod(geometry.shape), dtype)


def finish_output(target, out, geometry, caller):
    """The result: ``out`` as the caller passed it (filled from ``target`` if that is a
    fresh buffer), or ``target`` with the logical shape as the caller's kind of array."""
    if out is None:
        return like_caller(logical_view(target, geometry), caller)
    numba_out = as_numba(out)
    if data_pointer(target) != data_pointer(numba_out):  # computed into a fresh buffer
        numba_out[...] = logical_view(target, geometry)
    return out

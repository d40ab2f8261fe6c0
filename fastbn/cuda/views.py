"""Device arrays as the kernels see them, from a :class:`fastbn.geometry.Geometry`.

Every kernel takes the flat buffer of an array dense in the geometry's axis order
(``axes``, outermost first).  Outputs are allocated in that order (from the caller's
library, :func:`fastbn.cuda.arrays.empty`) and handed back with the input's logical
shape, so a ``channels_last`` input gives a ``channels_last`` result.  Copies between
memory orders run fastbn's copy kernel on the call's stream (:mod:`fastbn.cuda.copies`),
never numba's synchronizing ``setitem``.
"""

from ..geometry import dense_strides, is_dense_in
from . import copies
from .arrays import as_numba, data_pointer, empty, flat, overlaps, strided_view


def is_dense(a, geometry):
    """True when numba array ``a``'s bytes are dense in the kernels' order."""
    return is_dense_in(a.shape, a.strides, a.dtype.itemsize, geometry.axes)


def logical_view(buffer, geometry):
    """The flat kernel-order ``buffer`` seen with the logical shape."""
    shape = geometry.shape
    return strided_view(buffer, shape, dense_strides(shape, buffer.dtype.itemsize, geometry.axes))


def new_output(caller, geometry, dtype, stream):
    """``(native, flat)``: a fresh array of ``caller``'s kind with the logical shape,
    dense in kernel order, and its flat numba view."""
    shape = geometry.shape
    native = empty(caller, shape, dtype, dense_strides(shape, dtype.itemsize, geometry.axes), stream)
    return native, flat(as_numba(native))


def kernel_input(a, geometry, stream, caller=None):
    """Numba array ``a`` (logical shape) as the flat kernel-order buffer; copied (on
    ``stream``, into an array of ``caller``'s kind) if not dense."""
    if is_dense(a, geometry):
        return flat(a)
    _, buffer = new_output(a if caller is None else caller, geometry, a.dtype, stream)
    copies.copy(a, logical_view(buffer, geometry), stream)
    return buffer


def as_dense(x, geometry, stream):
    """``x`` itself when its bytes are dense in the kernels' order, else such a copy
    (logical shape, the caller's kind of array), so that later views of it are free."""
    a = as_numba(x)
    if is_dense(a, geometry):
        return x
    native, buffer = new_output(x, geometry, a.dtype, stream)
    copies.copy(a, logical_view(buffer, geometry), stream)
    return native


def output_target(out, inputs, geometry, dtype, caller, stream):
    """``(native, flat)``: what an elementwise kernel writes.  ``out`` (a numba array or
    None) itself when it is dense in kernel order and is either exactly an input
    (elementwise kernels read and write the same index) or disjoint from all of them;
    else a fresh array of ``caller``'s kind (``native``, None when ``out`` is used)."""
    if out is not None and is_dense(out, geometry):
        target = flat(out)
        if all(data_pointer(target) == data_pointer(a) or not overlaps(target, a) for a in inputs):
            return None, target
    return new_output(caller, geometry, dtype, stream)


def finish_output(native, target, out, geometry, stream):
    """The result: ``out`` as the caller passed it (filled from ``target`` by the copy
    kernel if that is a fresh buffer), or the fresh ``native`` array."""
    if out is None:
        return native
    if native is not None:  # computed into a fresh buffer
        copies.copy(logical_view(target, geometry), as_numba(out), stream)
    return out

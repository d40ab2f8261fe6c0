"""NumPy arrays as the kernels see them, from a :class:`fastbn.geometry.Geometry`.

Planes kernels take the C-contiguous 3-D view ``(outer, kept, inner)``, row kernels the
2-D ``(outer, kept)`` one.  Outputs are allocated in the memory order the kernels run in
and handed back with the input's logical shape.

The kernels see 16-bit storage (float16, bfloat16) through the integer views of
:func:`fastbn.half.storage_view`: this module is where every data array becomes a
kernel view, so it is the one place that makes them.  Everything else on the host side
(outputs, ``out``, copies) stays in the caller's storage dtype.
"""

import functools

import numpy as np

from ..geometry import PLANES, dense_strides, is_dense_in
from ..half import VIEW_DTYPES, storage_view


def _in_kernel_order(a, geometry):
    return a if _is_identity(geometry.axes) else np.transpose(a, geometry.axes)


def _logical(buffer, geometry):
    """A kernel-order buffer seen with the logical axes."""
    return buffer if _is_identity(geometry.axes) else np.transpose(buffer, _inverse(geometry.axes))


@functools.lru_cache(maxsize=None)
def _is_identity(axes):
    return axes == tuple(range(len(axes)))


@functools.lru_cache(maxsize=None)
def _inverse(axes):
    return tuple(int(a) for a in np.argsort(axes))


def kernel_view(a, geometry):
    """``a`` (logical shape) as the C-contiguous view the kernels take, copied if not dense."""
    ordered = _as_kernel_dtype(np.ascontiguousarray(_in_kernel_order(a, geometry)))
    if geometry.family == PLANES:
        return ordered.reshape(geometry.view_shape)
    return ordered.reshape(geometry.outer, geometry.kept)


def block_view(a, geometry):
    """``a`` as the C-contiguous 3-D ``(outer, kept, inner)`` view, copied if not dense."""
    return _as_kernel_dtype(np.ascontiguousarray(_in_kernel_order(a, geometry))).reshape(geometry.view_shape)


def _as_kernel_dtype(a):
    """``a`` as the kernels type it: 16-bit float storage as its integer view."""
    return storage_view(a, _storage_name(a.dtype)) if a.itemsize == 2 else a


@functools.lru_cache(maxsize=None)
def _storage_name(dtype):
    # NumPy computes a dtype's name on every access (several us): small calls notice.
    return dtype.name


class KernelViews:
    """The kernel views of arrays of one geometry and storage dtype, worked out once: what
    :func:`block_view` and :func:`new_output` do, without their per-call decisions, for
    the small-tensor passes that run in microseconds (:mod:`fastbn.cpu.fused`)."""

    def __init__(self, geometry, dtype):
        self.geometry = geometry
        self.dtype = np.dtype(dtype)
        identity = _is_identity(geometry.axes)
        self._to_kernel_order = None if identity else geometry.axes
        self._to_logical = None if identity else _inverse(geometry.axes)
        self._buffer_shape = tuple(geometry.shape[a] for a in geometry.axes)
        self._view_shape = geometry.view_shape
        self._kernel_dtype = VIEW_DTYPES.get(self.dtype.name)  # None: the kernels take the storage dtype
        self._dense_strides = dense_strides(tuple(geometry.shape), self.dtype.itemsize, tuple(geometry.axes))

    def view(self, a):
        """``a`` (logical shape, dense in the geometry's order, of the storage dtype) as the
        C-contiguous ``(outer, kept, inner)`` kernel view."""
        if self._to_kernel_order is not None:
            a = a.transpose(self._to_kernel_order)
        a = a.reshape(self._view_shape)
        return a if self._kernel_dtype is None else a.view(self._kernel_dtype)

    def new_output(self):
        """A new uninitialized array of the logical shape, dense in the kernels' order, and its kernel view."""
        buffer = np.empty(self._view_shape, self.dtype)
        logical = buffer.reshape(self._buffer_shape)
        if self._to_logical is not None:
            logical = logical.transpose(self._to_logical)
        return logical, buffer if self._kernel_dtype is None else buffer.view(self._kernel_dtype)

    def output(self, out):
        """Where a one-call pass writes, and its kernel view: ``out`` itself when it is
        dense in the kernels' order, else a new array (``out`` None, or strided: then
        :func:`finish_output` copies into it).  ``out`` may overlap the inputs: the
        one-call kernels write through a temporary when it does in part
        (:func:`fastbn.cpu.fused.partial_overlap`)."""
        if out is None or not (out.strides == self._dense_strides or is_dense(out, self.geometry)):
            return self.new_output()
        return out, self.view(out)


@functools.lru_cache(maxsize=256)
def kernel_views(geometry, dtype):
    """The :class:`KernelViews` of ``geometry`` and storage ``dtype`` (a NumPy dtype), built once."""
    return KernelViews(geometry, dtype)


def storage_values(view, dtype):
    """A kernel view seen again as storage ``dtype`` (its values, for host-side NumPy)."""
    return view if view.dtype == dtype else view.view(dtype)


def as_dense(a, geometry):
    """``a`` itself when its bytes are dense in the kernels' order, else such a copy
    (logical shape), so that later views of it are free."""
    if is_dense(a, geometry):
        return a
    return _logical(np.ascontiguousarray(_in_kernel_order(a, geometry)), geometry)


def is_dense(a, geometry):
    """True when ``a``'s bytes are dense in the kernels' order."""
    return is_dense_in(a.shape, a.strides, a.itemsize, geometry.axes)


def new_output(geometry, dtype):
    """An uninitialized array of the logical shape whose bytes are in the kernels' order."""
    return kernel_views(geometry, np.dtype(dtype)).new_output()[0]


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides)


def output_target(out, inputs, geometry):
    """Where a kernel writes: ``out`` itself when it is dense in the kernels' order and
    cannot be clobbered mid-kernel, else a fresh buffer (copied into ``out`` afterwards).

    Elementwise kernels read and write the same index, so ``out`` may *be* an input;
    a partial or shifted overlap would read already-written values, so it gets a buffer.
    """
    if out is not None and is_dense(out, geometry) and all(
            _same_view(out, a) or not np.may_share_memory(out, a) for a in inputs):
        return out
    return new_output(geometry, inputs[0].dtype)


def finish_output(target, out):
    """The result: ``target``, or ``out`` filled from it when they differ."""
    if out is not None and target is not out:
        out[...] = target
        return out
    return target

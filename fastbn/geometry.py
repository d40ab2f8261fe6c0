"""The reduction geometry: which axes reduce, which are kept, and the memory order the
kernels read them in, for every backend.

A normalization reduces over some axes and keeps the others.  The kernels see the data
as a C-contiguous 3-D view ``(outer, kept, inner)``: statistics are per ``kept`` index,
reduced over ``outer`` and ``inner``.  Which of two kernel families runs follows the
*bytes*, not the stated layout:

- ``PLANES``: the kept axis lies outside a contiguous run of reduced values.  Batch norm
  on channel-first memory is (N, C, S), S the product of the spatial dimensions.
- ``ROWS``: the kept axis is innermost (``inner == 1``).  Batch norm on channel-last
  memory is (N * S, C, 1): each row a pixel, each column a channel.

So a PyTorch ``channels_last`` tensor seen as NCHW runs the row kernels without a copy.
An array in neither order (sliced, transposed, negative strides) is copied once into the
layout's natural order; :attr:`Geometry.dense` says whether that is needed.

Batch norm keeps the channel axis (:func:`batch_norm_geometry`); layer norm (keep the
leading axes), instance norm (keep N and C) and virtual batches (keep a slice of N and C)
are other choices of kept axes over the same two families.
"""

import functools
import math
from typing import NamedTuple

from . import _checks

PLANES, ROWS = "planes", "rows"


class Geometry(NamedTuple):
    """How an array of logical ``shape`` is read by the kernels.

    family : PLANES or ROWS.
    axes : the logical axes in the kernels' memory order, outermost first (the array
        is used without a copy when its bytes are dense in this order).
    outer, kept, inner : the sizes of the kernels' 3-D view ``(outer, kept, inner)``.
    dense : whether the array's bytes are already dense in ``axes``.
    """

    shape: tuple
    family: str
    axes: tuple
    outer: int
    kept: int
    inner: int
    dense: bool

    @property
    def view_shape(self):
        """``(outer, kept, inner)``."""
        return (self.outer, self.kept, self.inner)

    @property
    def count(self):
        """Values reduced into each kept index: ``outer * inner``."""
        return self.outer * self.inner


@functools.lru_cache(maxsize=1024)
def dense_strides(shape, itemsize, axes):
    """Byte strides of a C-contiguous array whose axes, outermost first, are ``axes``."""
    strides = [0] * len(shape)
    step = itemsize
    for axis in reversed(axes):
        strides[axis] = step
        step *= shape[axis]
    return tuple(strides)


def is_dense_in(shape, strides, itemsize, axes):
    """True when an array's elements are contiguous in the axis order ``axes``
    (size-1 axes ignored, as NumPy's contiguity flags do)."""
    expected = dense_strides(tuple(shape), itemsize, tuple(axes))
    return all(size == 1 or stride == want for size, stride, want in zip(shape, strides, expected))


@functools.lru_cache(maxsize=1024)
def batch_norm_geometry(shape, strides, itemsize, layout):
    """The :class:`Geometry` of batch norm (keep the channel axis) for an array of logical
    ``shape`` in ``layout`` ("NCHW" or "NHWC") with byte ``strides`` (tuples; cached:
    a training loop asks for the same few geometries at every step)."""
    shape = tuple(shape)
    ndim = len(shape)
    channel = _checks.channel_axis(ndim, layout)
    spatial = tuple(a for a in range(1, ndim) if a != channel)
    plane_size = math.prod(shape[a] for a in spatial)
    planes_axes = (0, channel) + spatial
    rows_axes = (0,) + spatial + (channel,)
    if plane_size > 1 and is_dense_in(shape, strides, itemsize, planes_axes):
        family, dense = PLANES, True
    elif is_dense_in(shape, strides, itemsize, rows_axes):
        family, dense = ROWS, True
    else:
        family = PLANES if layout == "NCHW" and plane_size > 1 else ROWS
        dense = False
    num_channels = shape[channel]
    if family == PLANES:
        return Geometry(shape, PLANES, planes_axes, shape[0], num_channels, plane_size, dense)
    return Geometry(shape, ROWS, rows_axes, shape[0] * plane_size, num_channels, 1, dense)


def _c_order_geometry(shape, strides, itemsize, family, outer, kept, inner):
    axes = tuple(range(len(shape)))
    return Geometry(tuple(shape), family, axes, outer, kept, inner, is_dense_in(shape, strides, itemsize, axes))


def layer_norm_geometry(shape, strides, itemsize, num_normalized):
    """The :class:`Geometry` of layer norm over the trailing ``num_normalized`` axes:
    the C-order view ``(1, M, K)`` in PLANES, one kept index per leading position (M the
    product of the leading sizes, K that of the normalized ones)."""
    shape = tuple(shape)
    kept = math.prod(shape[:len(shape) - num_normalized])
    return _c_order_geometry(shape, strides, itemsize, PLANES, 1, kept, math.prod(shape) // kept)


def instance_geometry(shape, strides, itemsize):
    """The :class:`Geometry` keeping (N, C) of a channel-first array (N, C, ...): the
    C-order view ``(1, N * C, S)`` in PLANES, S the product of the spatial sizes (1 for
    rank 2).  Group and instance norm reduce these per-(n, c) statistics further."""
    shape = tuple(shape)
    return _c_order_geometry(shape, strides, itemsize, PLANES, 1, shape[0] * shape[1], math.prod(shape[2:]))


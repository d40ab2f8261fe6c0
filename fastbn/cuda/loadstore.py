"""How the kernels walk their index space, load and store: the device building blocks
of :mod:`fastbn.cuda.elementwise`, compiled per :class:`Variant`, whose index types
and 16-bit word conversions the reductions (:mod:`fastbn.cuda.planes`,
:mod:`fastbn.cuda.rows`) use too.

Index width.  A tensor of fewer than 2**31 elements is walked with ``uint32`` indices,
one past that with ``int64`` (the launchers pick, :func:`variant_of`,
:func:`needs_wide_index`).  Numba types
integer arithmetic in at least 64 bits, so every index expression here is wrapped in
the variant's ``index`` type: the truncation lets LLVM narrow the 64-bit operations
back to 32-bit ones (unsigned, so no sign fix-ups in divisions and no negative-index
wraparound in array accesses).  The grid-stride overshoot (a few grid widths past the
end) stays far below 2**32, so unsigned indices never wrap.

Units.  A thread handles *units*: single values, or, for 16-bit storage whose arrays
all start at the same 4-byte phase, *pairs* of values loaded and stored as one ``uint32``
word (:func:`fastbn.cuda.arrays.word_view`) and converted by :func:`pair_codec`.  A
paired launch covers elements ``[head, head + 2 * units)``; the
one element before (a start 2 bytes past a 4-byte boundary) and the one after (an odd
count) are done singly by the grid's first thread (:func:`edges`).

Cursors.  Element ``e`` belongs to channel ``(e // S) % C``.  Each thread keeps, for
each of its four units, the offset in the plane and the channel of the unit's first
element and advances them by additions (one division per thread, at the start): four
loads in flight per thread, neighbouring threads on neighbouring addresses.
"""

import collections
import functools

import numba
import numpy as np
from numba import cuda, types

from ..half import bits_of_float16, float16_from_bits, narrow, widen
from .plans import UNROLL

#: One compiled form of the elementwise kernels: ``paired`` (16-bit values two per
#: word) and ``wide_index`` (int64 instead of uint32 indices).
Variant = collections.namedtuple("Variant", ["paired", "wide_index"])

#: Tensors with at least this many elements index in 64 bits.
INDEX32_LIMIT = 2 ** 31


def variant_of(size, phases):
    """The :class:`Variant` for ``size`` elements of 16-bit storage whose arrays start at
    byte ``phases`` modulo 4 (an empty tuple for wider storage): pairs when they all
    share one phase, 32-bit indices below :data:`INDEX32_LIMIT`."""
    return Variant(len(set(phases)) == 1 and size >= 2, needs_wide_index(size))


def index_type(wide_index):
    """The index type of one index width: int64 when ``wide_index``, else uint32."""
    return np.int64 if wide_index else np.uint32


def needs_wide_index(size):
    """True when a launch over ``size`` elements must index in 64 bits."""
    return size >= INDEX32_LIMIT


@functools.cache
def walkers(wide_index):
    """``(index, cursor, advance, next_channel)``: the index type and the cursor device
    functions of one index width."""
    index = index_type(wide_index)

    @cuda.jit(device=True)
    def cursor(e, plane_size, num_channels):
        """(offset in its plane, channel) of element ``e``: the thread's one division."""
        plane = index(e // plane_size)
        return index(e - plane * plane_size), index(plane % num_channels)

    @cuda.jit(device=True)
    def advance(offset, c, step_offset, step_channels, plane_size, num_channels):
        """The cursor moved by ``step_channels`` whole planes (mod C) and ``step_offset``
        values: additions and at most one carry each."""
        offset = index(offset + step_offset)
        c = index(c + step_channels)
        if offset >= plane_size:
            offset = index(offset - plane_size)
            c = index(c + 1)
        if c >= num_channels:
            c = index(c - num_channels)
        return offset, c

    @cuda.jit(device=True)
    def next_channel(offset, c, plane_size, num_channels):
        """The channel of the element after the one at cursor ``(offset, c)``."""
        if index(offset + 1) < plane_size:
            return c
        c = index(c + 1)
        return c if c < num_channels else index(0)

    return index, cursor, advance, next_channel


@functools.cache
def pair_codec(dtype):
    """``(low, high, pack)`` for words of two 16-bit values of kernel-view ``dtype``
    (float16, or int16 for bfloat16): the float32 of each half (little-endian: the lower
    address is the low half), and the word of two float32 values rounded to the format.
    float16 halves go through the hardware's float16 conversions (a bit cast, then one
    ``cvt`` each way); bfloat16 through :mod:`fastbn.half`'s bit conversions."""
    if np.dtype(dtype) == np.float16:
        @cuda.jit(device=True)
        def to_float(bits):
            return numba.float32(float16_from_bits(np.uint16(bits)))

        @cuda.jit(device=True)
        def to_bits(value):
            return np.uint32(bits_of_float16(types.float16(value)))
    else:
        @cuda.jit(device=True)
        def to_float(bits):
            return widen(np.int16(bits))

        @cuda.jit(device=True)
        def to_bits(value):
            return np.uint32(narrow(value, np.int16)) & np.uint32(0xFFFF)

    @cuda.jit(device=True)
    def low(word):
        return to_float(word & np.uint32(0xFFFF))

    @cuda.jit(device=True)
    def high(word):
        return to_float(word >> np.uint32(16))

    @cuda.jit(device=True)
    def pack(first, second):
        return np.uint32(to_bits(first) | (to_bits(second) << np.uint32(16)))

    return low, high, pack


def grid_loop(load, store, span, wide_index):
    """Device function ``run(units, first, plane_size, num_channels, ops)``: this thread's
    units of ``[0, units)`` (element ``first + span * u`` starts unit ``u``), four in
    flight: ``load(u, ops)`` for four units, then ``store(u, value, offset, c,
    plane_size, num_channels, ops)`` for each with its cursor.  The loads come first in
    the source because ``out`` may be the input (the compiler could not move them)."""
    index, cursor, advance, _ = walkers(wide_index)

    @cuda.jit(device=True)
    def run(units, first, plane_size, num_channels, ops):
        n = index(units)
        threads = index(index(cuda.gridDim.x) * index(cuda.blockDim.x))
        step = index(UNROLL * threads)
        elements = index(span * step)
        planes = index(elements // plane_size)
        step_offset = index(elements - planes * plane_size)
        step_channels = index(planes % num_channels)
        u0 = index(index(cuda.blockIdx.x) * index(cuda.blockDim.x) + index(cuda.threadIdx.x))
        u1 = index(u0 + threads)
        u2 = index(u1 + threads)
        u3 = index(u2 + threads)
        o0, c0 = cursor(index(first + span * u0), plane_size, num_channels)
        o1, c1 = cursor(index(first + span * u1), plane_size, num_channels)
        o2, c2 = cursor(index(first + span * u2), plane_size, num_channels)
        o3, c3 = cursor(index(first + span * u3), plane_size, num_channels)
        while u3 < n:
            v0 = load(u0, ops)
            v1 = load(u1, ops)
            v2 = load(u2, ops)
            v3 = load(u3, ops)
            store(u0, v0, o0, c0, plane_size, num_channels, ops)
            store(u1, v1, o1, c1, plane_size, num_channels, ops)
            store(u2, v2, o2, c2, plane_size, num_channels, ops)
            store(u3, v3, o3, c3, plane_size, num_channels, ops)
            u0 = index(u0 + step)
            u1 = index(u1 + step)
            u2 = index(u2 + step)
            u3 = index(u3 + step)
            o0, c0 = advance(o0, c0, step_offset, step_channels, plane_size, num_channels)
            o1, c1 = advance(o1, c1, step_offset, step_channels, plane_size, num_channels)
            o2, c2 = advance(o2, c2, step_offset, step_channels, plane_size, num_channels)
            o3, c3 = advance(o3, c3, step_offset, step_channels, plane_size, num_channels)
        if u0 < n:
            store(u0, load(u0, ops), o0, c0, plane_size, num_channels, ops)
        if u1 < n:
            store(u1, load(u1, ops), o1, c1, plane_size, num_channels, ops)
        if u2 < n:
            store(u2, load(u2, ops), o2, c2, plane_size, num_channels, ops)

    return run


def edges(load, store, wide_index):
    """Device function ``run(head, units, size, plane_size, num_channels, ops)`` of a
    paired launch: the grid's first thread does, singly, element 0 when ``head`` is 1
    and element ``head + 2 * units`` when that is below ``size``."""
    index, cursor, _, _ = walkers(wide_index)

    @cuda.jit(device=True)
    def run(head, units, size, plane_size, num_channels, ops):
        if cuda.blockIdx.x != 0 or cuda.threadIdx.x != 0:
            return
        if head != 0:
            o, c = cursor(index(0), plane_size, num_channels)
            store(index(0), load(index(0), ops), o, c, plane_size, num_channels, ops)
        last = index(head + 2 * units)
        if last < size:
            o, c = cursor(last, plane_size, num_channels)
            store(last, load(last, ops), o, c, plane_size, num_channels, ops)

    return run

"""16-bit float storage: exact conversions between float16/bfloat16 bit patterns and float32.

Numba cannot type float16 arrays on the CPU and has no bfloat16 at all, so kernels read and
write 16-bit storage through ``uint16`` views and convert each value with these functions.
They are jitted for every target (CPU and CUDA device code) and run as plain Python on the
CUDA simulator, so both backends use this one implementation.

- Widening (``*_bits_to_float32``) is exact: every float16 and bfloat16 value is a float32.
- Narrowing (``float32_to_*_bits``) rounds to nearest, ties to even, as IEEE 754 and
  NumPy's ``astype(np.float16)`` / ml_dtypes' ``astype(bfloat16)`` do: values past the
  largest finite one round to infinity, tiny values to subnormals or signed zero, and a
  NaN stays a (quiet) NaN.

Kernels see 16-bit storage through integer views chosen so that the view's dtype alone
names the format, and each kernel compiles its own specialization per format:

==========  ==================  ==========================================
storage     kernel array dtype  conversions
==========  ==================  ==========================================
float16     ``uint16``          :func:`float16_bits_to_float32` and back
bfloat16    ``int16``           :func:`bfloat16_bits_to_float32` and back
float16     ``float16``         native (numba.cuda types float16 arrays)
float32/64  itself              none
==========  ==================  ==========================================

so a kernel writes ``widen(x[i])`` on loads and ``narrow(value, y.dtype)`` on stores and
runs unchanged for every storage dtype (:func:`storage_view` makes the views).

The bit tricks are integer arithmetic with one float operation for subnormals (a "magic
number" add, exact in float32); there are no tables, so loops over them vectorize.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable


def _bit_casts(float_type, int_type):
    """``(from_bits, bits_of)``: reinterpret an IEEE value of ``float_type`` as the unsigned
    ``int_type`` of its width and back (numba types), jitted for every target through one
    LLVM bit cast each, and NumPy views as plain Python (the CUDA simulator's path)."""
    np_float, np_int = np.dtype(str(float_type)).type, np.dtype(str(int_type)).type

    def from_bits(bits):
        return np_int(bits).view(np_float)

    def bits_of(value):
        return np_float(value).view(np_int)

    @intrinsic
    def to_float(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(float_type))
        return float_type(int_type), codegen

    @intrinsic
    def to_int(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(int_type.bitwidth))
        return int_type(float_type), codegen

    overload(from_bits, target="generic")(lambda bits: lambda bits: to_float(int_type(bits)))
    overload(bits_of, target="generic")(lambda value: lambda value: to_int(float_type(value)))
    return from_bits, bits_of


#: float32 <-> its IEEE bit pattern (uint32).
float32_from_bits, bits_of_float32 = _bit_casts(types.float32, types.uint32)
#: float16 <-> its IEEE bit pattern (uint16): for targets that type float16 (CUDA).
float16_from_bits, bits_of_float16 = _bit_casts(types.float16, types.uint16)


#: float32 exponent bias minus float16's (127 - 15), shifted into the exponent field.
_REBIAS = np.uint32(112 << 23)
#: 0.5 as float32: its ulp is 2**-24, float16's subnormal spacing, so adding it to a value
#: below 2**-14 rounds that value (to nearest even) into the bottom bits of the mantissa.
_SUBNORMAL_MAGIC = np.uint32(126 << 23)


@register_jitable
def float16_bits_to_float32(bits):
    """float16 bit pattern (uint16) -> the same value as float32 (exact)."""
    h = np.uint32(bits) & np.uint32(0xFFFF)  # an int16 view's negative values too
    magnitude = (h & np.uint32(0x7FFF)) << np.uint32(13)
    exponent = magnitude & np.uint32(0x0F800000)
    if exponent == np.uint32(0x0F800000):  # infinity or NaN: all-ones exponent
        out = magnitude + np.uint32(224 << 23)
    elif exponent == np.uint32(0):  # zero or subnormal: scale the integer mantissa
        out = bits_of_float32(np.float32(magnitude >> np.uint32(13)) * np.float32(2.0 ** -24))
    else:
        out = magnitude + _REBIAS
    return float32_from_bits(out | ((h & np.uint32(0x8000)) << np.uint32(16)))


@register_jitable
def float32_to_float16_bits(value):
    """float32 ``value`` -> float16 bit pattern (uint16), rounded to nearest even."""
    bits = bits_of_float32(value)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    if magnitude >= np.uint32(143 << 23):  # >= 65536 (past float16's range), inf, NaN
        if magnitude > np.uint32(0x7F800000):
            out = np.uint32(0x7E00) | ((magnitude >> np.uint32(13)) & np.uint32(0x3FF))
        else:
            out = np.uint32(0x7C00)
    elif magnitude < np.uint32(113 << 23):  # below 2**-14: a float16 subnormal or zero
        # The float add rounds to nearest even at float16's subnormal spacing (2**-24).
        aligned = float32_from_bits(magnitude) + float32_from_bits(_SUBNORMAL_MAGIC)
        out = bits_of_float32(aligned) - _SUBNORMAL_MAGIC
    else:
        odd = (magnitude >> np.uint32(13)) & np.uint32(1)
        # Rebias, add just under half an ulp plus the odd bit (ties to even), truncate;
        # a carry into the exponent rounds up to the next binade or to infinity.
        out = (magnitude - _REBIAS + np.uint32(0xFFF) + odd) >> np.uint32(13)
    return np.uint16(out | sign)


@register_jitable
def bfloat16_bits_to_float32(bits):
    """bfloat16 bit pattern (uint16) -> the same value as float32 (exact)."""
    return float32_from_bits((np.uint32(bits) & np.uint32(0xFFFF)) << np.uint32(16))


@register_jitable
def float32_to_bfloat16_bits(value):
    """float32 ``value`` -> bfloat16 bit pattern (uint16), rounded to nearest even."""
    bits = bits_of_float32(value)
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it quiet
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x0040))
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    return np.uint16((bits + np.uint32(0x7FFF) + odd) >> np.uint32(16))


#: The kernel-side integer view of each 16-bit storage format (see the module's table).
VIEW_DTYPES = {"float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.int16)}


def storage_view(array, storage):
    """``array`` (NumPy, of 16-bit storage dtype named ``storage``) as the kernel view.

    float16 -> uint16, bfloat16 -> int16 (a zero-copy ``.view``); other storage dtypes are
    returned unchanged.  The view keeps the array's shape and strides.
    """
    view = VIEW_DTYPES.get(storage)
    return array if view is None else array.view(view)


def widen(value):
    """A stored value as the number it holds: float32 for 16-bit storage, else itself."""
    if isinstance(value, np.uint16):
        return float16_bits_to_float32(value)
    if isinstance(value, np.int16):
        return bfloat16_bits_to_float32(value)
    if isinstance(value, np.float16):
        return np.float32(value)
    return value


def narrow(value, dtype):
    """``value`` rounded (to nearest even) into storage ``dtype``, a kernel array's dtype."""
    dtype = np.dtype(dtype)
    if dtype == np.uint16:
        return float32_to_float16_bits(np.float32(value))
    if dtype == np.int16:
        return np.uint16(float32_to_bfloat16_bits(np.float32(value))).view(np.int16)
    return dtype.type(value)


@overload(widen, target="generic")
def _widen(value):
    if value == types.uint16:
        return lambda value: float16_bits_to_float32(value)
    if value == types.int16:
        return lambda value: bfloat16_bits_to_float32(value)
    if value == types.float16:
        return lambda value: numba.float32(value)
    return lambda value: value


@overload(narrow, target="generic")
def _narrow(value, dtype):
    storage = getattr(dtype, "dtype", getattr(dtype, "instance_type", None))
    if storage == types.uint16:
        return lambda value, dtype: float32_to_float16_bits(numba.float32(value))
    if storage == types.int16:
        return lambda value, dtype: numba.int16(float32_to_bfloat16_bits(numba.float32(value)))
    if storage in (types.float16, types.float32, types.float64):
        return lambda value, dtype: storage(value)
    return None

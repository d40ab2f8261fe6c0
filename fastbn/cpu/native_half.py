"""float16 conversions by the CPU's own instructions, where it has them, for the CPU kernels.

:func:`fastbn.half.widen` and :func:`fastbn.half.narrow` convert float16 bit patterns with
integer arithmetic and branches (exact, and the same code for every target).  On the
CPU, LLVM's ``fpext half`` / ``fptrunc ... to half`` do the same conversions (exact
widening; narrowing to nearest even, overflow to infinity, NaN kept) in one vector
instruction per 8 or 16 values on x86-64 with F16C (``vcvtph2ps``/``vcvtps2ph``) and on
AArch64 (``fcvtl``/``fcvtn``): the float16 passes ran 1.5-2.4x slower than float32 with
the integer conversions and about as fast as bfloat16 (half float32's time at best) with
these.

They are registered as CPU-target overloads of ``widen``/``narrow`` for ``uint16`` (the
kernels' float16 view), which Numba prefers to the generic ones when it compiles for the
CPU; other dtypes, other targets (CUDA) and CPUs without the instructions (where LLVM
would call a runtime function Numba does not link) keep :mod:`fastbn.half`'s code.
Importing this module registers them; :mod:`fastbn.cpu` imports it before any kernel
compiles.
"""

import platform

from llvmlite import binding, ir
from numba import types
from numba.core import config
from numba.extending import intrinsic, overload

from ..half import narrow, widen


def has_native_float16():
    """True when the CPU Numba compiles for converts float16 in hardware."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    if config.CPU_FEATURES:  # NUMBA_CPU_FEATURES: exactly these
        return "+f16c" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME not in (None, "host"):  # a named (portable) CPU: assume nothing
        return False
    return bool(binding.get_host_cpu_features().get("f16c", False))


NATIVE_FLOAT16 = has_native_float16()


@intrinsic
def _float16_bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _float32_to_float16_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@overload(widen, target="cpu")
def _widen_native(value):
    if NATIVE_FLOAT16 and value == types.uint16:
        return lambda value: _float16_bits_to_float32(value)
    return None


@overload(narrow, target="cpu")
def _narrow_native(value, dtype):
    if NATIVE_FLOAT16 and getattr(dtype, "dtype", None) == types.uint16:
        return lambda value, dtype: _float32_to_float16_bits(types.float32(value))
    return None

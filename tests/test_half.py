"""fastbn.half: 16-bit float bit patterns <-> float32, bit-exact against NumPy and ml_dtypes.

Widening is checked on all 65536 bit patterns; narrowing on every float16 value, the
midpoints between neighbours (ties to even) and their float32 neighbours, the overflow
and subnormal edges, and random float32 bit patterns (NaNs must stay NaN).
"""

import numba
import numpy as np
import pytest

from fastbn.half import (bfloat16_bits_to_float32, float16_bits_to_float32,
                         float32_to_bfloat16_bits, float32_to_float16_bits, narrow,
                         storage_view, widen)


@numba.njit(cache=True)
def _widen(bits, bfloat16):
    out = np.empty(bits.size, np.float32)
    for i in range(bits.size):
        out[i] = bfloat16_bits_to_float32(bits[i]) if bfloat16 else float16_bits_to_float32(bits[i])
    return out


@numba.njit(cache=True)
def _narrow(values, bfloat16):
    out = np.empty(values.size, np.uint16)
    for i in range(values.size):
        out[i] = float32_to_bfloat16_bits(values[i]) if bfloat16 else float32_to_float16_bits(values[i])
    return out


ALL_BITS = np.arange(1 << 16, dtype=np.uint16)


def _bfloat16():
    return pytest.importorskip("ml_dtypes").bfloat16


def _narrowing_cases():
    """float32 values that exercise every rounding branch of both narrowings."""
    with np.errstate(invalid="ignore", over="ignore"):
        halves = ALL_BITS.view(np.float16).astype(np.float64)
        finite = np.sort(halves[np.isfinite(halves)])
        mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)
        edges = np.float32([65504, 65519.996, 65520, 65536, 3.4e38, 2.0 ** -24, 2.0 ** -25,
                            2.0 ** -25 * 1.0001, 2.0 ** -14 * (1 - 2.0 ** -11), -0.0, np.inf,
                            -np.inf, np.nan])
    random_bits = np.random.default_rng(0).integers(0, 1 << 32, 200_000, dtype=np.uint64)
    return np.concatenate([finite.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(-np.inf)), edges,
                           random_bits.astype(np.uint32).view(np.float32)])


def _assert_same_bits_or_both_nan(got_bits, expected_bits, dtype):
    got, expected = got_bits.view(dtype).astype(np.float32), expected_bits.view(dtype).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got_bits[~nan], expected_bits[~nan])


def test_float16_widening_is_exact_on_every_bit_pattern():
    expected = ALL_BITS.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(_widen(ALL_BITS, False).view(np.uint32), expected.view(np.uint32))


def test_bfloat16_widening_is_exact_on_every_bit_pattern():
    expected = ALL_BITS.view(_bfloat16()).astype(np.float32)
    np.testing.assert_array_equal(_widen(ALL_BITS, True).view(np.uint32), expected.view(np.uint32))


def test_float16_narrowing_rounds_to_nearest_even():
    values = _narrowing_cases()
    with np.errstate(invalid="ignore", over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    _assert_same_bits_or_both_nan(_narrow(values, False), expected, np.float16)


def test_bfloat16_narrowing_rounds_to_nearest_even():
    bfloat16 = _bfloat16()
    values = _narrowing_cases()
    with np.errstate(invalid="ignore", over="ignore"):
        expected = values.astype(bfloat16).view(np.uint16)
    _assert_same_bits_or_both_nan(_narrow(values, True), expected, bfloat16)


def test_python_implementation_matches_the_jitted_one():
    """The CUDA simulator runs these functions as plain Python: they must agree there too."""
    values = _narrowing_cases()[::97]
    bits = ALL_BITS[::7]
    with np.errstate(over="ignore"):
        for bfloat16 in (False, True):
            narrow = float32_to_bfloat16_bits if bfloat16 else float32_to_float16_bits
            widen = bfloat16_bits_to_float32 if bfloat16 else float16_bits_to_float32
            np.testing.assert_array_equal([narrow(v) for v in values], _narrow(values, bfloat16))
            np.testing.assert_array_equal(np.float32([widen(b) for b in bits]).view(np.uint32),
                                          _widen(bits, bfloat16).view(np.uint32))


@numba.njit(cache=True)
def _scaled_copy(x, factor, y):
    for i in range(x.size):
        y[i] = narrow(widen(x[i]) * factor, y.dtype)


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float32", "float64"])
def test_widen_and_narrow_select_the_format_from_the_view_dtype(storage):
    """One kernel source serves every storage dtype: the view's dtype picks the codec."""
    dtype = _bfloat16() if storage == "bfloat16" else np.dtype(storage)
    values = np.float32([1.5, -3.25, 1e-3, 7e4, -0.0, 3e-6, np.inf, 1 + 2.0 ** -9])
    with np.errstate(over="ignore"):
        x = values.astype(dtype)
        # x * 3 is exact in float32 (at most 11 + 2 significant bits): one rounding only.
        factor = np.float64(3) if storage == "float64" else np.float32(3)
        expected = (x.astype(factor.dtype) * factor).astype(dtype)
    y = np.empty_like(x)
    _scaled_copy(storage_view(x, storage), factor, storage_view(y, storage))
    np.testing.assert_array_equal(y.view(np.uint8), expected.view(np.uint8))
    python = np.empty_like(storage_view(x, storage))  # the simulator's path: plain Python
    with np.errstate(over="ignore"):
        _scaled_copy.py_func(storage_view(x, storage), factor, python)
    np.testing.assert_array_equal(python.view(np.uint8), expected.view(np.uint8))

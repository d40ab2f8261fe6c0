"""The kernels' variants (:mod:`fastbn.cuda.loadstore`) against NumPy.

16-bit storage runs two values per 32-bit word when every array of a launch starts at
the same 4-byte phase, the odd element at each end singly; other phases run one value
at a time.  Tensors index in 32 bits below a threshold and in 64 bits past it; the
threshold is lowered here so a tiny tensor runs the 64-bit kernels.  Every variant must
give the same values, within one rounding of the storage format of the float64 truth.
Reductions over 16-bit planes of even size, or rows of an even number of channels,
read words when the buffers are aligned.
"""

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from _cuda_checks import (BFLOAT16, FLOAT_DTYPES, ONE_WARP, device, host, make_case,  # noqa: E402
                          stats_rtol, storage_spacing)

import fastbn  # noqa: E402
from fastbn.cuda import elementwise, launch_config, loadstore, stages  # noqa: E402
from fastbn.cuda.arrays import as_numba  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

SIXTEEN_BIT = [d for d in FLOAT_DTYPES if np.dtype(d).itemsize == 2]
#: 37 values: an odd count (a single element after the last word).
SIZE = 37
#: (plane size, channels): planes of 3 values (odd, so words straddle planes and
#: channels) of 2 channels; rows of 3 channels (plane size 1: every word spans two).
GEOMETRIES = [(3, 2), (1, 3)]


@pytest.fixture
def variants(monkeypatch):
    """A list that receives the :class:`~fastbn.cuda.loadstore.Variant` of every launch."""
    seen = []
    real = elementwise.variant_of

    def recording(size, phases):
        seen.append(real(size, phases))
        return seen[-1]

    monkeypatch.setattr(elementwise, "variant_of", recording)
    return seen


def _flat(values, dtype, offset):
    """``values`` stored as ``dtype`` in a device buffer from element ``offset`` (the
    kernel view of that stretch, and the buffer)."""
    buffer = np.zeros(len(values) + 2, dtype)
    buffer[offset:offset + len(values)] = values.astype(dtype)
    d = device(buffer)
    return as_numba(d)[offset:offset + len(values)], d


def _channel_of(size, plane, channels):
    return (np.arange(size) // plane) % channels


def _assert_stored_close(got_buffer, offset, truth, dtype):
    got = host(got_buffer)[offset:offset + len(truth)].astype(np.float64)
    np.testing.assert_array_less(np.abs(got - truth), storage_spacing(truth, dtype) + 1e-30)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["planes", "rows"])
@pytest.mark.parametrize("offsets", [(0, 0, 0), (1, 1, 1), (0, 1, 0)], ids=["aligned", "both-odd", "mixed"])
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_16_bit_words_and_single_values_agree_with_numpy(rng, variants, dtype, offsets, geometry):
    """apply (with residual and ReLU), backward_apply and relu_mask on every phase:
    words with the single elements at both ends, or single values throughout."""
    plane, channels = geometry
    x = rng.standard_normal(SIZE) * 4
    r = rng.standard_normal(SIZE)
    g = rng.standard_normal(SIZE)
    c = _channel_of(SIZE, plane, channels)
    center, scale, shift = (rng.standard_normal(channels).astype(np.float32) for _ in range(3))
    xf, _ = _flat(x, dtype, offsets[0])
    rf, _ = _flat(r, dtype, offsets[1])
    gf, _ = _flat(g, dtype, offsets[0])
    yf, y_buffer = _flat(np.zeros(SIZE), dtype, offsets[2])
    x, r, g = (np.asarray(v.astype(dtype), np.float64) for v in (x, r, g))
    vectors = [cuda.to_device(v) for v in (center, scale, shift)]
    with launch_config.override(**ONE_WARP):
        elementwise.launch_apply(xf, rf, yf, np.float32(0), plane, channels, *vectors, 0)
        truth = np.maximum((x - center[c]) * scale[c] + shift[c] + r, 0)
        _assert_stored_close(y_buffer, offsets[2], truth, dtype)
        # dy_scale = scale, x_scale = shift, shift = center: three distinct vectors.
        elementwise.launch_backward_apply(gf, xf, yf, plane, channels, *vectors, vectors[0], 0)
        truth = g * scale[c] + (x - center[c]) * shift[c] + center[c]
        _assert_stored_close(y_buffer, offsets[2], truth, dtype)
        elementwise.launch_relu_mask(gf, xf, yf, 0)
        _assert_stored_close(y_buffer, offsets[2], np.where(x <= 0, 0, g), dtype)
    paired = offsets[0] == offsets[1] == offsets[2]
    assert [v.paired for v in variants] == [paired, offsets[0] == offsets[2], offsets[0] == offsets[2]]
    assert not any(v.wide_index for v in variants)


#: float32 on rows (NHWC), bfloat16 on planes (NCHW): both reduction families, a paired
#: and a single-value elementwise form.
WIDE_CASES = [(np.float32, "NHWC")] + ([(BFLOAT16.type, "NCHW")] if BFLOAT16 is not None else [])


@pytest.mark.parametrize("dtype, layout", WIDE_CASES)
def test_64_bit_indices_give_the_32_bit_results(rng, monkeypatch, variants, dtype, layout):
    """The whole training step (reductions and elementwise passes), with the 64-bit
    index kernels forced on a tiny tensor: the same values, bit for bit."""
    case = make_case(rng, (3, 4, 5, 7), layout, dtype)
    d = {k: device(v) for k, v in case.items()}

    def step():
        y, mean, invstd = fastbn.batch_norm_forward(d["x"], d["weight"], d["bias"], layout=layout)
        dx, dw, db = fastbn.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["weight"], layout=layout)
        return [host(a) for a in (y, mean, invstd, dx, dw, db)]

    with launch_config.override(**ONE_WARP):
        narrow = step()
        monkeypatch.setattr(loadstore, "INDEX32_LIMIT", 2)
        wide = step()
    assert [v.wide_index for v in variants] == [False] * 2 + [True] * 2
    for a, b in zip(narrow, wide):
        np.testing.assert_array_equal(a, b)


def _within(got, want, atol):
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= atol), (got, want, atol)


def _misaligned(a):
    """A device copy of ``a`` starting 2 bytes past a 4-byte boundary."""
    buffer = cuda.to_device(np.zeros(a.size + 1, a.dtype))
    view = buffer[1:]
    view.copy_to_device(a.reshape(-1))
    return view.reshape(a.shape)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_16_bit_reductions_in_words_and_single_values_agree_with_numpy(rng, monkeypatch, dtype, layout):
    """Planes of even size (NCHW) and rows of an even number of channels (NHWC) reduce
    two values per 32-bit word when the buffers are 4-byte aligned, single values
    otherwise; both within the float32 accumulation bound of the float64 truth (mean,
    variance; sum(dy), sum(dy * (x - mean)))."""
    shape = (3, 4, 5, 6) if layout == "NCHW" else (3, 5, 6, 4)
    axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean_ref, var_ref = x64.mean(axis=axes), x64.var(axis=axes)
    mean32 = mean_ref.astype(np.float32)
    centered = dy64 * (x64 - np.expand_dims(mean32, axes))
    n = x.size // 4
    # float32 sums of n terms: <= 4 n u32 of the sum of their magnitudes (Higham 4.3),
    # the shifted moments as in _cuda_checks.stats_rtol.
    rtol = stats_rtol(x, layout)
    sum_atol = 4 * n * np.finfo(np.float32).eps / 2
    words = []
    real = stages.reduction

    def recording(geom, *arrays):
        red = real(geom, *arrays)
        words.append(red.units[0].dtype == np.uint32)
        return red

    monkeypatch.setattr(stages, "reduction", recording)
    with launch_config.override(**ONE_WARP):
        for d_x, d_dy in ((device(x), device(dy)), (_misaligned(x), _misaligned(dy))):
            mean, var = (host(a) for a in fastbn.batch_stats(d_x, layout=layout))
            _within(mean, mean_ref, rtol * (np.abs(mean_ref) + np.sqrt(var_ref)))
            _within(var, var_ref, rtol * var_ref)
            sums = stages.backward_sums(d_dy, d_x, cuda.to_device(mean32), stages.geometry(d_x, layout))
            _within(host(sums.sum_dy), dy64.sum(axis=axes), sum_atol * np.abs(dy64).sum(axis=axes))
            _within(host(sums.sum_dy_xmu), centered.sum(axis=axes), sum_atol * np.abs(centered).sum(axis=axes))
            np.testing.assert_array_equal(host(sums.count), n)
    assert words == [True, True, False, False]

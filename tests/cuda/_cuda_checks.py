"""Helpers of the CUDA tests: cases, the device runs checked against the float64
NumPy reference, and tolerances derived from the dtype policy.

The test modules run on a GPU, or on Numba's CUDA simulator when
``NUMBA_ENABLE_CUDASIM=1`` was set before numba was imported (``tests/test_cuda.py``
starts such a run in a subprocess when this process has no GPU); each skips itself when
numba.cuda can run neither.

The simulator runs every thread as a Python thread, so shapes here are tiny and the
launch configuration is forced small (32- or 64-thread blocks, few values per block,
few blocks) so that the tiny shapes still take every path: several blocks per
channel with their partials merged by a second kernel, several warps per block,
grid-stride elementwise loops.  On a GPU the same tests run plus larger shapes.
"""

import numba
import numpy as np
from numba import cuda

import fastbn
from fastbn import reference
from fastbn._checks import values_per_channel
from fastbn.dtypes import numpy_dtype, policy

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
BFLOAT16 = numpy_dtype("bfloat16")  # None without ml_dtypes
FLOAT_DTYPES = (np.float16, np.float32, np.float64) + (() if BFLOAT16 is None else (BFLOAT16.type,))
LAYOUTS = ("NCHW", "NHWC")
#: Small geometry: one warp per block, 4 blocks at most (so the elementwise kernels
#: loop grid-stride and each channel is reduced by one block).
ONE_WARP = dict(threads_per_block=32, max_blocks=4, values_per_block=1 << 20)
#: Multi-block geometry: two warps per block (the cross-warp merge), 40 values per
#: reduction block: on (3, 4, 5, 6) NCHW reduces each channel's 90 values in 3
#: blocks, NHWC each channel's 60 rows in 12 blocks of 5 rows (8 row lanes).
MANY_BLOCKS = dict(threads_per_block=64, max_blocks=64, values_per_block=40)
SHAPES = [(3, 4, 5, 6)] if SIMULATOR else [(3, 4, 5, 6), (8, 16, 17, 19), (2, 3, 64, 64), (64, 40)]

# --------------------------------------------------------------------------- helpers

def param_dtype(dtype):
    """weight / bias / running statistics dtype: float32 for 16-bit input."""
    return policy(dtype).parameters.type


def accumulator_eps(dtype):
    """Unit roundoff-scale of the sums: float32 for 16-bit input, float64 otherwise."""
    return np.finfo(policy(dtype).accumulate).eps


def storage_spacing(value, dtype):
    """The spacing of 16-bit storage ``dtype`` at |``value``| (rounded into it): float16's
    from NumPy; bfloat16's is float32's at the same value times 2**16 (8 mantissa bits
    instead of 24, the same exponent range, subnormals included)."""
    stored = np.abs(np.asarray(value, dtype=np.float64)).astype(dtype)
    if np.dtype(dtype) == np.float16:
        return np.spacing(stored).astype(np.float64)
    return np.spacing(stored.astype(np.float32)).astype(np.float64) * 2.0 ** 16


def reference_input(a):
    """``a`` as the NumPy reference takes it: bfloat16 (which it does not store) as
    float64, the exact values; other dtypes unchanged."""
    return a.astype(np.float64) if a is not None and a.dtype == BFLOAT16 else a


def stats_rtol(x, layout):
    """Relative bound on mean (relative to |mean| + std), var and invstd of ``x``.

    Per thread, recursive summation of n terms shifted by one of the thread's values
    errs by <= n u of the sum of their magnitudes (Higham 4.3); with the shift a data
    value, at most z std from the mean (z = max |x - mean| / std), those magnitudes
    are <= (1 + z**2) times the variance term: 4 n u (1 + z**2) with n >= 16.  Chan
    merges see each partial mean with an absolute error u |mean|, which moves M2 by
    2 |delta| w u |mean| per merge (w = n_a n_b / n); summed over a merge tree of
    depth <= 16 (Cauchy-Schwarz, sum of w <= 16 n) that is <= 8 u |mean| / std
    relative.  u: the accumulator's unit roundoff (float32 for float16 input).  The
    same bound covers invstd (half the relative error of var, plus two roundings).
    """
    dtype = x.dtype.type
    axes = tuple(a for a in range(x.ndim) if a != (1 if layout == "NCHW" else x.ndim - 1))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    std = x64.std(axis=axes, keepdims=True)
    z = np.max(np.abs(x64 - mean) / std)
    u = accumulator_eps(dtype) / 2
    n = values_per_channel(x.shape, layout)
    return u * (4 * max(n, 16) * (1 + z * z) + 8 * np.max(np.abs(mean) / std))


def elementwise_atol(dtype, magnitude, reference_value):
    """Bound on |fastbn - reference| for y or dx, elementwise.

    The kernels evaluate ``(x - center) * scale + shift`` (dx: one more product and
    sum) in the compute dtype (float32 for float16 and float32, float64 for float64)
    from coefficients rounded once from the accumulator: at most 8 roundings of an
    operand no larger than ``magnitude`` (the largest |term| of the result), i.e.
    <= 4 eps * magnitude.  16-bit results are then rounded to their format, as is (or
    may be) the reference's float64 result: the two may land on neighbouring values,
    one spacing of the format at the result apart.
    """
    atol = 4 * np.finfo(policy(dtype).compute).eps * magnitude
    if np.dtype(dtype).itemsize == 2:
        atol = atol + storage_spacing(reference_value, dtype)
    return atol


def host(a):
    return a.copy_to_host()


def device(a):
    return None if a is None else cuda.to_device(a)


def make_case(rng, shape_nchw, layout, dtype, offset=3.0):
    """x (offset + randn) in ``layout``, dy, and float parameters of the right dtype."""
    shape = shape_nchw if layout == "NCHW" or len(shape_nchw) == 2 else (
        shape_nchw[0], *shape_nchw[2:], shape_nchw[1])
    channels = shape_nchw[1]
    pdt = param_dtype(dtype)
    return dict(
        x=(offset + rng.standard_normal(shape)).astype(dtype),
        dy=rng.standard_normal(shape).astype(dtype),
        weight=(1 + 0.5 * rng.standard_normal(channels)).astype(pdt),
        bias=rng.standard_normal(channels).astype(pdt),
        running_mean=rng.standard_normal(channels).astype(pdt),
        running_var=(0.5 + rng.random(channels)).astype(pdt),
    )


def per_channel(v, ndim, layout):
    shape = [1] * ndim
    shape[1 if layout == "NCHW" else ndim - 1] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def check_forward(case, layout, training, momentum=0.1, eps=1e-5, use_affine=True):
    """Run fastbn's forward on the device and the reference on the host; compare all outputs.

    Returns the device outputs (y, save_mean, save_invstd).
    """
    x, dtype = case["x"], case["x"].dtype.type
    weight = case["weight"] if use_affine else None
    bias = case["bias"] if use_affine else None
    d_rm, d_rv = device(case["running_mean"]), device(case["running_var"])
    d_x = device(x)
    y, save_mean, save_invstd = fastbn.batch_norm_forward(
        d_x, device(weight), device(bias), running_mean=d_rm, running_var=d_rv, training=training,
        momentum=momentum, eps=eps, layout=layout)
    rm_ref, rv_ref = case["running_mean"].copy(), case["running_var"].copy()
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(
        reference_input(x), weight, bias, running_mean=rm_ref, running_var=rv_ref, training=training,
        momentum=momentum, eps=eps, layout=layout)

    stat_dtype = policy(dtype).statistics
    assert cuda.devicearray.is_cuda_ndarray(y) and y.shape == x.shape and y.dtype == x.dtype
    assert save_mean.dtype == save_invstd.dtype == stat_dtype
    assert save_mean.shape == (x.shape[1 if layout == "NCHW" else -1],)
    np.testing.assert_array_equal(host(d_x), x)  # input untouched

    rtol = stats_rtol(x, layout)
    if training:
        std = 1 / invstd_ref
        assert np.all(np.abs(host(save_mean) - mean_ref) <= rtol * (np.abs(mean_ref) + std))
        np.testing.assert_allclose(host(save_invstd), invstd_ref, rtol=rtol)
    else:  # eval: the running statistics, rounded once into the statistics dtype
        np.testing.assert_allclose(host(save_mean), mean_ref, rtol=np.finfo(stat_dtype).eps)
        np.testing.assert_allclose(host(save_invstd), invstd_ref, rtol=4 * np.finfo(stat_dtype).eps)
    # Running statistics: the update in the accumulator, rounded once into param dtype.
    running_rtol = np.finfo(param_dtype(dtype)).eps + rtol
    np.testing.assert_allclose(host(d_rm), rm_ref, rtol=running_rtol, atol=running_rtol)
    np.testing.assert_allclose(host(d_rv), rv_ref, rtol=running_rtol)

    scale = invstd_ref * (1 if weight is None else weight.astype(np.float64))
    shift = 0 if bias is None else per_channel(bias, x.ndim, layout)
    centered = np.abs(x.astype(np.float64) - per_channel(mean_ref, x.ndim, layout))
    magnitude = np.max(centered * per_channel(np.abs(scale), x.ndim, layout) + np.abs(shift))
    # Statistics errors move y by <= rtol * magnitude-scale on top of the rounding.
    atol = elementwise_atol(dtype, magnitude, y_ref) + rtol * magnitude
    assert np.all(np.abs(host(y).astype(np.float64) - y_ref.astype(np.float64)) <= atol)
    return y, save_mean, save_invstd


def check_backward(case, layout, training, save_mean, save_invstd, use_weight=True):
    """fastbn's backward on the device vs the reference given the same saved statistics."""
    x, dy, dtype = case["x"], case["dy"], case["x"].dtype.type
    weight = case["weight"] if use_weight else None
    d_dy, d_x = device(dy), device(x)
    dx, dweight, dbias = fastbn.batch_norm_backward(
        d_dy, d_x, save_mean, save_invstd, device(weight), training=training, layout=layout)
    mean, invstd = host(save_mean), host(save_invstd)
    dx_ref, dweight_ref, dbias_ref = reference.batch_norm_backward(
        reference_input(dy), reference_input(x), mean, invstd, weight, training=training, layout=layout)

    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dweight.dtype == dbias.dtype == param_dtype(dtype)
    np.testing.assert_array_equal(host(d_dy), dy)
    np.testing.assert_array_equal(host(d_x), x)

    n = values_per_channel(x.shape, layout)
    axes = tuple(a for a in range(x.ndim) if a != (1 if layout == "NCHW" else x.ndim - 1))
    x_hat = (x.astype(np.float64) - per_channel(mean, x.ndim, layout)) * per_channel(invstd, x.ndim, layout)
    dy64 = dy.astype(np.float64)
    # Sums of n terms in the accumulator (<= 4 n u of the sum of |terms|), then one
    # rounding into the parameter dtype.
    sum_rtol = 4 * max(n, 16) * accumulator_eps(dtype) / 2
    param_eps = np.finfo(param_dtype(dtype)).eps
    dbias_atol = sum_rtol * np.abs(dy64).sum(axis=axes) + param_eps * np.abs(dbias_ref)
    dweight_atol = sum_rtol * np.abs(dy64 * x_hat).sum(axis=axes) + param_eps * np.abs(dweight_ref)
    assert np.all(np.abs(host(dbias) - dbias_ref) <= dbias_atol)
    assert np.all(np.abs(host(dweight) - dweight_ref) <= dweight_atol)

    w_invstd = per_channel(np.abs(invstd * (1 if weight is None else weight.astype(np.float64))), x.ndim, layout)
    if training:
        magnitude = np.max(w_invstd * (np.abs(dy64) + per_channel(np.abs(dbias_ref) / n, x.ndim, layout)
                                       + np.abs(x_hat) * per_channel(np.abs(dweight_ref) / n, x.ndim, layout)))
        # dweight / dbias errors enter dx through the two 1/n terms.
        magnitude_of_sums = np.max(w_invstd * (per_channel(dbias_atol / n, x.ndim, layout)
                                               + np.abs(x_hat) * per_channel(dweight_atol / n, x.ndim, layout)))
    else:
        magnitude = np.max(w_invstd * np.abs(dy64))
        magnitude_of_sums = 0.0
    atol = elementwise_atol(dtype, magnitude, dx_ref) + magnitude_of_sums
    assert np.all(np.abs(host(dx).astype(np.float64) - dx_ref.astype(np.float64)) <= atol)
    return dx

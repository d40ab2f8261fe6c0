"""Robustness of the CUDA backend: device-array argument checks, state kept
on errors, NaN/Inf channel isolation, constant channels with tiny eps, ``out`` aliasing.

Runs where tests/cuda runs: on a GPU, or under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported, in a separate process).
Shapes are tiny (the simulator runs each GPU thread as a Python thread).
Tolerance: y is a few roundings in the input dtype of terms <= max|y| + |bias|, so
``16 * eps * magnitude`` (:func:`conftest._atol`; float16 inputs are computed in float32
and rounded once more, covered by float16's own eps).
"""

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import fastbn  # noqa: E402
from fastbn import reference  # noqa: E402

from _helpers import _atol, _x  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


D = cuda.to_device


@pytest.mark.parametrize("call, exc, fragments", [
    (lambda: fastbn.batch_norm_forward(D(_x((4, 3))), np.ones(3, np.float32)), TypeError,
     ["weight:", "CUDA device array"]),
    (lambda: fastbn.batch_norm_forward(D(_x((4, 3))), D(np.ones(4, np.float32))), ValueError,
     ["weight:", "(3,)", "(4,)"]),
    (lambda: fastbn.batch_norm_forward(D(_x((4, 3))), D(np.ones(3))), TypeError, ["weight:", "float64"]),
    (lambda: fastbn.batch_norm_forward(D(np.ones((4, 3), np.int32))), TypeError, ["x:", "int32"]),
    (lambda: fastbn.batch_norm_forward(D(_x((1, 3)))), ValueError,
     ["Expected more than 1 value per channel when training"]),
    (lambda: fastbn.batch_norm_forward(D(_x((4,)))), ValueError, ["x:", "rank 1"]),
    (lambda: fastbn.batch_norm_forward(D(_x((4, 3))), eps=0.0), ValueError, ["eps:"]),
    (lambda: fastbn.batch_norm_forward(D(_x((4, 3))), training=False), ValueError, ["running_mean"]),
    (lambda: fastbn.batch_norm_forward(D(_x((4, 3))), out=D(np.empty((4, 3)))), TypeError, ["out:", "float32"]),
    (lambda: fastbn.batch_norm_backward(D(_x((4, 3))), D(_x((4, 3), np.float64)), D(np.zeros(3)),
                                        D(np.ones(3))), TypeError, ["dy:", "float64"]),
])
def test_device_bad_arguments(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_device_error_keeps_running_stats_and_out():
    x = D(_x((4, 3, 5)))
    rm, rv = D(np.arange(3, dtype=np.float32)), D(np.ones(3, np.float32))
    out = D(np.full((4, 3, 5), 7.0, np.float32))
    with pytest.raises(ValueError):
        fastbn.batch_norm_forward(x, D(np.ones(4, np.float32)), None, running_mean=rm, running_var=rv,
                                  out=out)
    np.testing.assert_array_equal(rm.copy_to_host(), np.arange(3))
    np.testing.assert_array_equal(rv.copy_to_host(), 1.0)
    np.testing.assert_array_equal(out.copy_to_host(), 7.0)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_device_nan_stays_in_its_channel_and_constant_channel_gives_bias(layout):
    shape = (3, 4, 5) if layout == "NCHW" else (3, 5, 4)
    x = _x(shape, np.float32, seed=1)
    ch = (lambda a, c: a[:, c]) if layout == "NCHW" else (lambda a, c: a[..., c])
    ch(x, 1)[1, 2] = np.nan
    ch(x, 2)[...] = 2.5
    bias = np.array([0.0, 0.0, 7.5, 0.0], np.float32)
    xd = D(x)
    y, mean, invstd = fastbn.batch_norm_forward(xd, None, D(bias), eps=1e-30, layout=layout)
    y = y.copy_to_host()
    np.testing.assert_array_equal(x, xd.copy_to_host())  # input untouched
    assert np.isnan(ch(y, 1)).all()
    np.testing.assert_array_equal(ch(y, 2), 7.5)
    for c in (0, 3):
        xr = ch(x, c).astype(np.float64)
        expect = (xr - xr.mean()) / np.sqrt(xr.var() + 1e-30)
        np.testing.assert_allclose(ch(y, c), expect, rtol=0, atol=_atol(np.float32, np.abs(expect).max()))


def test_device_out_is_x():
    x = _x((4, 3, 5), np.float32, seed=2)
    xd = D(x)
    y = fastbn.batch_norm_forward(xd, out=xd)[0]
    yr = reference.batch_norm_forward(x.astype(np.float64))[0]
    np.testing.assert_allclose(xd.copy_to_host(), yr, rtol=0, atol=_atol(np.float32, np.abs(yr).max()))
    np.testing.assert_allclose(y.copy_to_host(), yr, rtol=0, atol=_atol(np.float32, np.abs(yr).max()))


def test_device_running_stats_sharing_memory_are_refused():
    """Both running statistics are written in place: views of one device buffer that
    overlap would race, so they are refused like overlapping NumPy arrays."""
    x = D(_x((4, 3, 5)))
    both = D(np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="running_var: expected an array separate from running_mean"):
        fastbn.batch_norm_forward(x, running_mean=both[:3], running_var=both[:3])
    before = both.copy_to_host()
    fastbn.batch_norm_forward(x, running_mean=both[:3], running_var=both[3:])  # disjoint halves
    assert not np.array_equal(both.copy_to_host(), before)

"""The public stages (fastbn.stages) compose into the public functions, and counts come
from merged statistics.

Composing the stages on the whole array runs exactly the kernels the public functions
run, so those results are compared bitwise.  A batch split in two and merged differs
from the whole only by the rounding of the merge (float64, relative ~1e-15 on the
statistics), which moves float32 y/dx by at most a few float32 ulps: checked against
``conftest.elementwise_atol``.
"""

import numpy as np
import pytest

import fastbn
from fastbn import stages

from _helpers import elementwise_atol, to_layout

# Serial small-tensor kernels and the parallel planes/rows kernels (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")

LAYOUTS = ("NCHW", "NHWC")


def _data(rng, layout, dtype, n=8):
    x = (rng.standard_normal(to_layout((n, 6, 5, 4), layout)) * 2 + 50).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight = rng.standard_normal(6).astype(dtype)
    bias = rng.standard_normal(6).astype(dtype)
    return x, dy, weight, bias


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stages_compose_into_the_public_functions(rng, layout, dtype):
    x, dy, weight, bias = _data(rng, layout, dtype)
    rm, rv = np.zeros(6, dtype), np.ones(6, dtype)
    rm_s, rv_s = rm.copy(), rv.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, weight, bias, running_mean=rm, running_var=rv, momentum=0.3, layout=layout)

    c = stages.forward_coefficients(stages.moments(x, layout=layout), weight, bias, dtype=dtype,
                                    running_mean=rm_s, running_var=rv_s, momentum=0.3)
    np.testing.assert_array_equal(stages.apply(x, c, layout=layout), y)
    np.testing.assert_array_equal(c.mean, save_mean)
    np.testing.assert_array_equal(c.invstd, save_invstd)
    np.testing.assert_array_equal(rm_s, rm)
    np.testing.assert_array_equal(rv_s, rv)

    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight, layout=layout)
    sums = stages.backward_sums(dy, x, c.mean, layout=layout)
    bc = stages.backward_coefficients(sums, c.mean, c.invstd, weight, dtype=dtype)
    np.testing.assert_array_equal(stages.backward_apply(dy, x, bc, layout=layout), dx)
    g = stages.parameter_gradients(sums, c.invstd, dtype=dtype)
    np.testing.assert_array_equal(g[0], dweight)
    np.testing.assert_array_equal(g[1], dbias)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_coefficients_from_a_mean_var_pair(rng, layout):
    x, dy, weight, bias = _data(rng, layout, np.float32)
    rm = rng.standard_normal(6).astype(np.float32)
    rv = rng.uniform(0.5, 2, 6).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                                training=False, layout=layout)
    c = stages.forward_coefficients((rm, rv), weight, bias, dtype=np.float32)
    np.testing.assert_array_equal(stages.apply(x, c, layout=layout), y)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, training=False, layout=layout)
    sums = stages.backward_sums(dy, x, mean, layout=layout)
    bc = stages.backward_coefficients(sums, mean, invstd, weight, dtype=np.float32, training=False)
    np.testing.assert_array_equal(stages.backward_apply(dy, x, bc, layout=layout), dx)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", [1, 3, 7])
def test_counts_come_from_the_merged_statistics(rng, layout, split):
    """Two processes' halves, merged, reproduce the whole batch: y, dx, and the running
    variance's n / (n - 1) use the merged count, not the local one."""
    x, dy, weight, bias = _data(rng, layout, np.float32)
    parts = (slice(0, split), slice(split, None))
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    rm_p, rv_p = rm.copy(), rv.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=rm, running_var=rv,
                                                          layout=layout)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight, layout=layout)

    merged = stages.moments(x[parts[0]], layout=layout).merge(stages.moments(x[parts[1]], layout=layout))
    c = stages.forward_coefficients(merged, weight, bias, dtype=np.float32, running_mean=rm_p, running_var=rv_p)
    sums = stages.backward_sums(dy[parts[0]], x[parts[0]], c.mean, layout=layout).merge(
        stages.backward_sums(dy[parts[1]], x[parts[1]], c.mean, layout=layout))
    bc = stages.backward_coefficients(sums, c.mean, c.invstd, weight, dtype=np.float32)
    for p in parts:
        atol = elementwise_atol(np.float32, np.abs(y).max())
        np.testing.assert_allclose(stages.apply(x[p], c, layout=layout), y[p], rtol=0, atol=atol)
        atol = elementwise_atol(np.float32, np.abs(dx).max())
        np.testing.assert_allclose(stages.backward_apply(dy[p], x[p], bc, layout=layout), dx[p], rtol=0, atol=atol)
    np.testing.assert_allclose(rv_p, rv, rtol=1e-6)
    np.testing.assert_allclose(rm_p, rm, rtol=1e-6)


def test_stage_errors_name_the_argument(rng):
    x, dy, weight, _ = _data(rng, "NCHW", np.float32)
    m = stages.moments(x)
    with pytest.raises(TypeError, match="stats: expected Moments or a \\(mean, var\\) pair"):
        stages.forward_coefficients(m.mean, dtype=np.float32)
    with pytest.raises(TypeError, match="dtype: expected float32 or float64"):
        stages.forward_coefficients(m, dtype=np.int32)
    with pytest.raises(ValueError, match="running_mean, running_var: expected None with a \\(mean, var\\)"):
        stages.forward_coefficients((m.mean, m.var), dtype=np.float32,
                                    running_mean=np.zeros(6, np.float32), running_var=np.ones(6, np.float32))
    one = stages.moments(x[:1, :, :1, :1])
    with pytest.raises(ValueError, match="stats.count: expected more than 1 value"):
        stages.forward_coefficients(one, dtype=np.float32, running_mean=np.zeros(6, np.float32),
                                    running_var=np.ones(6, np.float32))
    with pytest.raises(ValueError, match="stats.count: expected more than 0"):
        stages.forward_coefficients(fastbn.Moments.empty(6), dtype=np.float32)
    with pytest.raises(ValueError, match="weight: expected shape \\(6,\\)"):
        stages.forward_coefficients(m, np.ones(5, np.float32), dtype=np.float32)
    c = stages.forward_coefficients(m, dtype=np.float32)
    with pytest.raises(ValueError, match="coefficients.center: expected shape \\(4,\\)"):
        stages.apply(np.ones((3, 4), np.float32), c)
    with pytest.raises(TypeError, match="coefficients.center: expected dtype float64, got float32"):
        stages.apply(x.astype(np.float64), c)
    with pytest.raises(TypeError, match="coefficients: expected ForwardCoefficients"):
        stages.apply(x, tuple(c[:3]))
    with pytest.raises(ValueError, match="dy: expected the shape of x"):
        stages.backward_sums(dy[:2], x, c.mean)
    with pytest.raises(TypeError, match="sums: expected BackwardSums"):
        stages.backward_coefficients(m, c.mean, c.invstd, dtype=np.float32)


def test_eval_never_writes_or_returns_the_running_statistics(rng):
    x = rng.standard_normal((4, 3, 5))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    rm.flags.writeable = rv.flags.writeable = False
    y, save_mean, save_invstd = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False)
    assert not np.shares_memory(save_mean, rm)
    np.testing.assert_array_equal(save_mean, rm)
    np.testing.assert_allclose(save_invstd, 1 / np.sqrt(rv + 1e-5), rtol=1e-15)

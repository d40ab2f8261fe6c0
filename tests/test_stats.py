"""Mergeable statistics: :class:`fastbn.Moments`, its merge and :func:`fastbn.stream_moments`.

Tolerances.  The merged and the one-shot moments are both float64 and differ only by
rounding: the one-shot pass by ~2 n u relative (conftest.stats_rtol), each Chan merge by
~5 u on M2 and ~2 u on the mean (see fastbn.stats), so ``stats_rtol(n) + 10 P u`` bounds
the difference for P partials.  Against the two-pass float64 reference the same bound
holds.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _helpers import U64, stats_rtol, to_layout

# Serial small-tensor kernels and the parallel planes/rows kernels (conftest.kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")


def _bound(n, parts):
    return stats_rtol(n) + 10 * parts * U64


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_match_the_two_pass_reference(rng, layout, dtype):
    x = (rng.standard_normal(to_layout((6, 5, 7, 9), layout)) * 3 + 1e4).astype(dtype)
    m = fastbn.moments(x, layout=layout)
    ref = reference.moments(x, layout=layout)
    assert all(v.dtype == np.float64 and v.shape == (5,) for v in m)
    np.testing.assert_array_equal(m.count, ref.count)
    n = 6 * 7 * 9
    np.testing.assert_allclose(m.mean, ref.mean, rtol=_bound(n, 1))
    np.testing.assert_allclose(m.m2, ref.m2, rtol=_bound(n, 1))
    mean, var = fastbn.batch_stats(x, layout=layout)
    np.testing.assert_array_equal(mean, m.mean)
    np.testing.assert_array_equal(var, m.var)


@pytest.mark.parametrize("sizes", [(1, 1), (3, 17), (50, 1, 2), (7, 7, 7, 7)])
def test_merge_of_uneven_chunks_equals_one_shot(rng, sizes):
    x = rng.standard_normal((sum(sizes), 4, 3)) * np.array([1.0, 1e-3, 1e3, 0.0])[:, None] + 5.0
    edges = np.cumsum((0,) + sizes)
    parts = [fastbn.moments(x[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    merged = parts[0].merge(*parts[1:])
    whole = fastbn.moments(x)
    np.testing.assert_array_equal(merged.count, whole.count)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=_bound(x.size, len(sizes)), atol=0)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=_bound(x.size, len(sizes)), atol=1e-300)


def test_zero_count_is_neutral_and_exact(rng):
    m = fastbn.moments(rng.standard_normal((9, 3)))
    empty = fastbn.Moments.empty(3)
    for merged in (m.merge(empty), empty.merge(m), empty.merge(m, empty)):
        for got, want in zip(merged, m):
            np.testing.assert_array_equal(got, want)


def test_merge_is_deterministic_and_order_matters_only_by_rounding(rng):
    parts = [fastbn.moments(rng.standard_normal((n, 5)) + 1e3) for n in (3, 11, 2, 40)]
    a = parts[0].merge(*parts[1:])
    b = parts[0].merge(*parts[1:])
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    reverse = parts[-1].merge(*parts[-2::-1])
    np.testing.assert_allclose(reverse.mean, a.mean, rtol=_bound(56, 4))
    np.testing.assert_allclose(reverse.m2, a.m2, rtol=_bound(56, 4))


def test_var_and_invstd(rng):
    x = rng.standard_normal((20, 3))
    m = fastbn.moments(x)
    np.testing.assert_allclose(m.var, x.var(axis=0), rtol=1e-13)
    np.testing.assert_allclose(m.invstd(1e-5), 1 / np.sqrt(x.var(axis=0) + 1e-5), rtol=1e-13)
    assert np.all(np.isnan(fastbn.Moments.empty(2).var))


def test_merge_refuses_other_channel_counts_and_types(rng):
    m = fastbn.moments(rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match="merge: expected Moments of shape \\(3,\\)"):
        m.merge(fastbn.Moments.empty(4))
    with pytest.raises(TypeError, match="merge: expected Moments, got tuple"):
        m.merge((m.count, m.mean, m.m2))


def test_stream_of_200_memmap_chunks_equals_one_shot(tmp_path, rng, capsys):
    shape = (2000, 8, 4, 4)
    data = np.lib.format.open_memmap(tmp_path / "data.npy", mode="w+", dtype=np.float32, shape=shape)
    data[:] = rng.standard_normal(shape) * 2 + 300
    data.flush()
    chunks = np.load(tmp_path / "data.npy", mmap_mode="r")
    merged = fastbn.stream_moments((chunks[i:i + 10] for i in range(0, shape[0], 10)),
                                   progress=True, total=200)
    assert "200/200" in capsys.readouterr().err
    whole = reference.moments(np.asarray(chunks))
    np.testing.assert_array_equal(merged.count, whole.count)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var, whole.var, rtol=1e-12)


def test_stream_refuses_no_chunks():
    with pytest.raises(ValueError, match="chunks: expected at least one chunk"):
        fastbn.stream_moments([])

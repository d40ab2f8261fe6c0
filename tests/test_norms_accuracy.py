"""Statistics of layer, group and instance norm on float32 data at a 1e4 offset: variance
relative error <= 1e-6 against the float64 two-pass statistics of the same float32 values
(the issue's bound), for every op and both layouts."""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from _norms_helpers import channels_last

EPS = 1e-30  # var = invstd**-2 - eps: eps far below float64 resolution of var ~1


def _var(invstd):
    return 1.0 / np.asarray(invstd, np.float64) ** 2 - EPS


def _offset(rng, shape):
    return (1e4 + rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_group_and_instance_norm_variance_at_offset(rng, layout):
    x = _offset(rng, (2, 8, 64, 64))
    x = channels_last(x) if layout == "NHWC" else x
    for groups in (4, 8):
        _, mean, invstd = fastbn.group_norm_forward(x, groups, eps=EPS, layout=layout)
        _, mean_ref, invstd_ref = reference.group_norm_forward(x, groups, eps=EPS, layout=layout)
        assert np.max(np.abs(_var(invstd) / _var(invstd_ref) - 1)) <= 1e-6
        assert np.max(np.abs(mean - mean_ref)) <= 1e-6


def test_layer_norm_variance_at_offset(rng):
    x = _offset(rng, (64, 1024))
    _, mean, invstd = fastbn.layer_norm_forward(x, 1024, eps=EPS)
    _, mean_ref, invstd_ref = reference.layer_norm_forward(x, 1024, eps=EPS)
    assert np.max(np.abs(_var(invstd) / _var(invstd_ref) - 1)) <= 1e-6
    assert np.max(np.abs(mean - mean_ref)) <= 1e-6

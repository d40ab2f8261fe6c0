"""Fixtures shared by the test suite; helpers live in ``_helpers`` (a module name of its
own: ``tests/cuda`` has a conftest too, and ``from conftest import`` would find either)."""

import numpy as np
import pytest

from fastbn.cpu import small


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=["serial", "parallel"], scope="module")
def kernel_path(request):
    """Run a module's tests with the serial small-tensor kernels (what the small arrays of
    the tests get by default) and again with the parallel planes and rows kernels forced."""
    saved = small.SMALL_SIZE
    if request.param == "parallel":
        small.SMALL_SIZE = 0
    yield request.param
    small.SMALL_SIZE = saved

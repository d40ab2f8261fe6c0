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


SIMULATOR_TEST = "test_cuda_backend_on_the_simulator"
#: The module of that test once its run is started (to stop it at the end of the session).
_simulator_module = None


def pytest_collection_modifyitems(session, config, items):
    """Run the CUDA simulator test last and start its subprocess now: the simulator is
    single-threaded Python for minutes, which then overlaps the rest of the suite."""
    global _simulator_module
    waiting = [item for item in items if item.name == SIMULATOR_TEST]
    if waiting:
        items[:] = [item for item in items if item.name != SIMULATOR_TEST] + waiting
        _simulator_module = waiting[0].module
        _simulator_module.start_simulator_run()


def pytest_sessionfinish(session, exitstatus):
    if _simulator_module is not None:
        _simulator_module.stop_simulator_run()

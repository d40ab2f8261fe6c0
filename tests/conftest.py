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


#: The background runs started at collection, in start order (see ``_background``).
_started_runs = []


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: a deselected test starts nothing
def pytest_collection_modifyitems(session, config, items):
    """Start every background run with the commands the selected tests marked
    ``background(run, command)`` check, and move those tests to the end, in the order
    their runs were started: each run then overlaps the rest of the suite, and the tests
    wait for it only when nothing else is left."""
    if config.option.collectonly:
        return
    needed = {}
    waiting = []
    for item in items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            run, command = marker.args
            needed.setdefault(run, set()).add(command)
            waiting.append(item)
    for run, commands in needed.items():
        if not run.started:
            run.start(commands)
            _started_runs.append(run)
    if waiting:
        order = {run: index for index, run in enumerate(_started_runs)}
        items[:] = [item for item in items if item not in waiting] + sorted(
            waiting, key=lambda item: order[item.get_closest_marker("background").args[0]])


def pytest_sessionfinish(session, exitstatus):
    for run in _started_runs:
        run.stop()

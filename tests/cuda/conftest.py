"""Fixtures of the CUDA tests (``tests/cuda``)."""

import sys

import numba
import pytest


@pytest.fixture(autouse=True, scope="module")
def quick_thread_switches():
    """Under the simulator the threads of a block wait on each other at every barrier
    and shuffle while the simulator's scheduler polls them; the default 5 ms GIL switch
    interval makes each wait cost milliseconds.  A shorter one halves the run time."""
    saved = sys.getswitchinterval()
    if numba.config.ENABLE_CUDASIM:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(saved)


def _load_top_conftest():
    """tests/conftest.py as a module: its helpers, for ``from conftest import ...`` in
    tests/cuda, where the module named ``conftest`` is this file."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "conftest.py"
    spec = importlib.util.spec_from_file_location("_fastbn_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_top = _load_top_conftest()
_atol, _x = _top._atol, _top._x

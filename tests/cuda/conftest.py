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


"""The CUDA backend's tests (``tests/cuda``), run on Numba's CUDA simulator when this
process has no GPU, and the host path's independence from CUDA.

The simulator must be chosen before numba is imported, which this pytest process has
long done for the CPU tests, so the simulator run is a separate ``python -m pytest
tests/cuda`` process with ``NUMBA_ENABLE_CUDASIM=1``.  Where this process can run
CUDA itself (a GPU, or the simulator already on), ``tests/cuda`` is collected here
directly and the subprocess is skipped.
"""

import os
import pathlib
import subprocess
import sys

import numba
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CUDA_TESTS = REPO_ROOT / "tests" / "cuda"
#: The simulator run takes about a minute on 2 cores; allow for a slow CI machine.
SIMULATOR_RUN_TIMEOUT_S = 900


def _cuda_runs_in_this_process():
    if numba.config.ENABLE_CUDASIM:
        return True
    from numba import cuda
    return cuda.is_available()


def test_cuda_backend_on_the_simulator():
    if _cuda_runs_in_this_process():
        pytest.skip("tests/cuda run directly in this process (GPU or simulator available)")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CUDA_TESTS)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=SIMULATOR_RUN_TIMEOUT_S)
    assert result.returncode == 0, (
        f"`NUMBA_ENABLE_CUDASIM=1 {' '.join(command[1:])}` failed:\n{result.stdout}\n{result.stderr}")
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout


def test_host_calls_never_import_cuda():
    """``import fastbn`` and host calls leave numba.cuda and fastbn.cuda unimported."""
    code = (
        "import sys, numpy as np, fastbn\n"
        "fastbn.batch_norm_forward(np.ones((4, 3)), training=True)\n"
        "loaded = [m for m in ('numba.cuda', 'fastbn.cuda') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

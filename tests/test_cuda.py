"""The CUDA backend's tests (``tests/cuda`` and ``test_layers_device.py``), run on
Numba's CUDA simulator when this process has no GPU, and the host path's independence
from CUDA.

The simulator must be chosen before numba is imported, which this pytest process has
long done for the CPU tests, so the simulator run is a separate ``python -m pytest``
process with ``NUMBA_ENABLE_CUDASIM=1``, started in the background when the suite is
collected and waited for last (``_background``).  Where this process can run CUDA itself
(a GPU, or the simulator already on), those tests are collected here directly and the
subprocess is skipped.
"""

import os
import pathlib
import subprocess
import sys

import numba
import pytest

from _background import BackgroundRun

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Every test that needs CUDA: the simulator runs them in one process.
CUDA_TESTS = ["tests/cuda", "tests/test_layers_device.py"]
SIMULATOR_COMMAND = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
SIMULATOR_RUN = BackgroundRun("cuda-simulator", {"simulator": SIMULATOR_COMMAND}, env={"NUMBA_ENABLE_CUDASIM": "1"})


def _cuda_runs_in_this_process():
    if numba.config.ENABLE_CUDASIM:
        return True
    from numba import cuda
    return cuda.is_available()


_IN_PROCESS = _cuda_runs_in_this_process()


@(pytest.mark.skip(reason="the CUDA tests run directly in this process (GPU or simulator available)")
  if _IN_PROCESS else pytest.mark.background(SIMULATOR_RUN, "simulator"))
def test_cuda_backend_on_the_simulator():
    text = SIMULATOR_RUN.output("simulator")
    last_line = text.strip().splitlines()[-1]
    assert " passed" in last_line, text
    # Only tests that need a real GPU (torch CUDA tensors) may skip on the simulator: any
    # other skip would hide a backend test behind a missing dependency.
    skips = [line for line in text.splitlines() if line.startswith("SKIPPED")]
    assert all(line.endswith("need a real GPU") for line in skips), text


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


def test_bench_gpu_plans_and_parses_without_a_gpu():
    """The GPU benchmark's pure-Python parts: its cases, L2 rotation and arguments."""
    from fastbn.cuda import bench_gpu

    cases = bench_gpu.plan_cases()
    shapes = {c.shape for c in cases}
    assert shapes == set(bench_gpu.SHAPES)
    assert {c.dtype for c in cases} == {"float32", "float16", "bfloat16"}
    assert {c.layout for c in cases} == {"NCHW", "NHWC"}
    # Rank-2 shapes have one memory order: once per dtype; rank-4 in both layouts.
    assert len(cases) == 3 * (2 * 5 + 1)
    big = next(c for c in cases if c.shape == (64, 64, 112, 112) and c.dtype == "float32")
    assert big.nbytes > bench_gpu.DEFAULT_L2_BYTES
    for c in cases:  # the rotated sets of one case exceed the L2 between two uses of one set
        assert c.input_sets >= 2 and (c.input_sets - 1) * 3 * c.nbytes >= 2 * bench_gpu.DEFAULT_L2_BYTES \
            or c.input_sets == bench_gpu.MAX_INPUT_SETS
    assert bench_gpu.bandwidth(big, "copy", 1.0) == 2 * big.nbytes / 1e9
    args = bench_gpu.parse_args(["--check", "--quick", "--iters", "5"])
    assert args.check and args.quick and args.iters == 5 and args.warmup >= 20
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--iters", "0"])
    result = subprocess.run([sys.executable, "-m", "fastbn.cuda.bench_gpu", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--check" in result.stdout, result.stderr

"""The CUDA backend's tests (``tests/cuda``), run on Numba's CUDA simulator when this
process has no GPU, and the host path's independence from CUDA.

The simulator must be chosen before numba is imported, which this pytest process has
long done for the CPU tests, so the simulator run is a separate ``python -m pytest
tests/cuda`` process with ``NUMBA_ENABLE_CUDASIM=1``, started in the background when
this test is collected and waited for last (see ``tests/conftest.py``).  Where this process can run
CUDA itself (a GPU, or the simulator already on), ``tests/cuda`` is collected here
directly and the subprocess is skipped.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import numba
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CUDA_TESTS = REPO_ROOT / "tests" / "cuda"
#: The simulator run takes a few minutes on 2 cores; allow for a slow CI machine.
SIMULATOR_RUN_TIMEOUT_S = 1500
SIMULATOR_COMMAND = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CUDA_TESTS)]

#: The background simulator run: (process, output file), see start_simulator_run.
_simulator_run = None


def _cuda_runs_in_this_process():
    if numba.config.ENABLE_CUDASIM:
        return True
    from numba import cuda
    return cuda.is_available()


def start_simulator_run():
    """Start the simulator run in the background (once).  The conftest calls this at
    collection so its single-threaded minutes overlap the rest of the suite; the test
    below waits for it."""
    global _simulator_run
    if _simulator_run is None and not _cuda_runs_in_this_process():
        output = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        process = subprocess.Popen(SIMULATOR_COMMAND, cwd=REPO_ROOT, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, text=True)
        _simulator_run = (process, output)
    return _simulator_run


def stop_simulator_run():
    """Kill a background run nobody waited for (the session ended early); close its output."""
    if _simulator_run is None:
        return
    process, output = _simulator_run
    if process.poll() is None:
        process.kill()
        process.wait()
    output.close()


def test_cuda_backend_on_the_simulator():
    if _cuda_runs_in_this_process():
        pytest.skip("tests/cuda run directly in this process (GPU or simulator available)")
    process, output = start_simulator_run()
    try:
        returncode = process.wait(timeout=SIMULATOR_RUN_TIMEOUT_S)
        output.seek(0)
        text = output.read()
    finally:
        stop_simulator_run()
    assert returncode == 0, f"`NUMBA_ENABLE_CUDASIM=1 {' '.join(SIMULATOR_COMMAND[1:])}` failed:\n{text}"
    last_line = text.strip().splitlines()[-1]
    assert " passed" in last_line and " skipped" not in last_line, text


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

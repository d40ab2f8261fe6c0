"""fastbn.distributed over MPI: P = 1..4 ranks (oversubscribed on small machines)
against single-process fastbn on the concatenated batch.

Each launch runs every case of its splits in one set of processes (process start-up
dominates the cost): ``mpiexec -n 4``, and the splits of P < 4 ranks on communicators of
its first P ranks; the worker is tests/distributed/mpi_worker.py.
"""

import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.importorskip("mpi4py")
from _distributed_launch import WORKERS, mpiexec, result_of, run  # noqa: E402

if mpiexec() is None:
    pytest.skip("mpiexec not found (pip install mpich)", allow_module_level=True)

TIMEOUT = 240

#: Uneven splits of a batch over P ranks, each with a zero-size or a one-sample rank.
SPLITS = {
    1: [[5]],
    2: [[0, 6], [1, 4]],
    3: [[1, 0, 5], [2, 3, 2]],
    4: [[2, 0, 3, 1], [0, 4, 0, 3]],
}


def launch(splits, errors=True, device=False):
    p = max(len(split) for split in splits)
    command = [mpiexec(), "-n", str(p), sys.executable, str(WORKERS / "mpi_worker.py"), json.dumps(splits)]
    command += (["--errors"] if errors else []) + (["--device"] if device else [])
    done = run(command, TIMEOUT, **({"NUMBA_ENABLE_CUDASIM": "1"} if device else {}))
    result = result_of(done)
    assert done.returncode == 0, done.stderr[-4000:]
    assert result["failures"] == [], "\n".join(result["failures"])
    return result["worst"]


def test_matches_single_process(capsys):
    """Train and eval, both layouts, float32 and float64, forward, backward and batch_stats;
    the mismatch errors on every rank; statistics bitwise equal on every rank.  One launch
    of 4 ranks: the splits of P = 1, 2, 3 run on its first P ranks."""
    worst = launch([split for p in sorted(SPLITS) for split in SPLITS[p]])
    with capsys.disabled():
        print(f"\nmpiexec -n 4 (P = 1, 2, 3, 4): worst differences {worst}")
    assert worst["stats_rel"] < 1e-12


def test_device_arrays_on_the_cuda_simulator(capsys):
    """numba device arrays (Numba's CUDA simulator in the ranks): statistics and sums on
    the device, the payload through the host, coefficients and apply on the device;
    1e4-offset data, a zero-size and a one-sample rank, both layouts; a rank mixing host
    and device arrays fails alone and the others name it."""
    worst = launch([[1, 0, 2]], errors=False, device=True)
    with capsys.disabled():
        print(f"\nmpiexec -n 3, device arrays (CUDA simulator): worst differences {worst}")
    assert worst["device_stats_rel"] < 1e-12


def _splits_of(p):
    return st.lists(st.integers(0, 4), min_size=p, max_size=p).filter(lambda s: sum(s) >= 2)


@settings(max_examples=1, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 3).flatmap(lambda p: st.lists(_splits_of(p), min_size=3, max_size=3)))
def test_hypothesis_splits(splits):
    """Three hypothesis-chosen splits over 2 or 3 ranks, in one launch (a process start
    costs more than a split's cases)."""
    launch(splits, errors=False)


def test_digits_mpi_example_matches_single_process():
    """examples/digits_mpi.py, briefly, on 2 ranks: it asserts the loss curves agree."""
    pytest.importorskip("sklearn")
    example = WORKERS.parents[1] / "examples" / "digits_mpi.py"
    done = run([mpiexec(), "-n", "2", sys.executable, str(example), "--epochs", "1"], TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "largest relative difference" in done.stdout

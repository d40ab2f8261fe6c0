"""Launching helpers for the multi-process tests (MPI and torch.distributed)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "distributed"


def mpiexec():
    """The mpiexec beside this Python (the ``mpich`` wheel's), else one on PATH, else None."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def env(**extra):
    """Small, quiet child processes that import this checkout's fastbn (``extra``: more variables)."""
    e = dict(os.environ, **extra)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return e


def run(command, timeout, **extra_env):
    """Run ``command``; a hang fails the test (TimeoutExpired) instead of blocking CI."""
    done = subprocess.run(command, env=env(**extra_env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done


def result_of(done):
    """The ``FASTBN_RESULT`` JSON a worker printed, or an AssertionError with its output."""
    for line in done.stdout.splitlines():
        if line.startswith("FASTBN_RESULT "):
            return json.loads(line[len("FASTBN_RESULT "):])
    raise AssertionError(f"worker printed no result (rc {done.returncode})\nstdout:\n{done.stdout[-4000:]}\n"
                         f"stderr:\n{done.stderr[-4000:]}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

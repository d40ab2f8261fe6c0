"""Concurrent and constrained use: Python threads calling fastbn at once (the kernels
release the GIL), Numba's non-thread-safe ``workqueue`` threading layer, a child forked
after the parent ran kernels (GNU OpenMP would kill it at its first parallel launch),
and no usable cache directory.  The process-level cases run in a child interpreter, so
an abort cannot take pytest down with it; they run in the background from collection on
(``_cold_cache``: the workqueue and fork children load the float32 kernels the
vectorization probe compiled, the no-cache one compiles in memory).

Threads must reproduce the single-threaded results bit for bit (same data, same
kernels).  A forked child may run the serial kernels, whose summation order differs
from the parallel ones, so it is compared with the parent at float32 rounding level
(``atol=1e-5`` on float32 ``y``/``dx`` of magnitude below ~4, ``rtol=1e-12`` on the
float64 mean).
"""

import sys
import textwrap
import threading

import numpy as np
import pytest

from _cold_cache import COLD_CACHE_RUN, NO_CACHE_RUN
from _helpers import DTYPES, LAYOUTS, B, F, _x


@pytest.mark.parametrize("layout", LAYOUTS)
def test_python_threads_get_correct_results(layout):
    """Several threads call fastbn at once (kernels release the GIL) with distinct inputs."""
    shapes = [(8, 16, 12, 12), (4, 3, 33), (16, 64), (2, 8, 5, 5, 5)]
    jobs = []
    for i, shape in enumerate(shapes * 2):
        dtype = DTYPES[i % 2]
        s = shape if layout == "NCHW" or len(shape) == 2 else (shape[0], *shape[2:], shape[1])
        x = _x(s, dtype, seed=100 + i, offset=i)
        expected = F(x, layout=layout)
        jobs.append((x, expected))
    errors = []
    barrier = threading.Barrier(len(jobs))

    def work(x, expected):
        try:
            barrier.wait()
            for _ in range(5):
                y, mean, invstd = F(x, layout=layout)
                dx = B(y, x, mean, invstd, layout=layout)[0]
                np.testing.assert_array_equal(y, expected[0])
                np.testing.assert_array_equal(mean, expected[1])
                assert dx.shape == x.shape
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]


_THREADS_SCRIPT = """
    import threading, numpy as np, numba, fastbn
    fastbn.cpu.small.SMALL_SIZE = 0  # these launches must be the parallel kernels
    xs = [np.random.default_rng(i).standard_normal((8, 16, 20, 20)).astype(np.float32) for i in range(4)]
    expected = [fastbn.batch_norm_forward(x)[0] for x in xs]
    bad = []
    def work(i):
        for _ in range(20):
            if not np.array_equal(fastbn.batch_norm_forward(xs[i])[0], expected[i]):
                bad.append(i)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(numba.threading_layer(), len(bad))
"""


WORKQUEUE = COLD_CACHE_RUN.add("workqueue", ["env", "NUMBA_THREADING_LAYER=workqueue", sys.executable, "-c",
                                             textwrap.dedent(_THREADS_SCRIPT)])


@pytest.mark.background(COLD_CACHE_RUN, WORKQUEUE)
def test_threads_on_workqueue_layer_do_not_abort():
    """Numba's workqueue layer aborts the process on concurrent launches; fastbn's
    launch lock must serialize them (run in a child so an abort cannot kill pytest)."""
    assert COLD_CACHE_RUN.output(WORKQUEUE).split() == ["workqueue", "0"]


_FORK_SCRIPT = """
    import multiprocessing as mp, numpy as np, numba, fastbn
    from fastbn.cpu import _jit
    fastbn.cpu.small.SMALL_SIZE = 0  # these launches must be the parallel kernels
    def child(q):
        x = np.random.default_rng(1).standard_normal((4, 6, 9, 9)).astype(np.float32)
        y, m, s = fastbn.batch_norm_forward(x)
        dx = fastbn.batch_norm_backward(y, x, m, s)[0]
        y2 = fastbn.batch_norm_forward(np.moveaxis(x, 1, -1).copy(), layout="NHWC")[0]
        q.put((y, m, dx, y2, _jit._serial_only))
    if __name__ == "__main__":
        x = np.random.default_rng(1).standard_normal((4, 6, 9, 9)).astype(np.float32)
        y, m, s = fastbn.batch_norm_forward(x)          # the parent launches kernels first
        dx = fastbn.batch_norm_backward(y, x, m, s)[0]
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        yc, mc, dxc, y2c, serial = q.get(timeout=200)
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        np.testing.assert_allclose(yc, y, rtol=0, atol=1e-5)
        np.testing.assert_allclose(mc, m, rtol=1e-12)
        np.testing.assert_allclose(dxc, dx, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.moveaxis(y2c, -1, 1), y, rtol=0, atol=1e-5)
        print(numba.threading_layer(), serial)
"""


FORK = COLD_CACHE_RUN.add("fork", [sys.executable, "-c", textwrap.dedent(
    _FORK_SCRIPT.replace('if __name__ == "__main__":', "if True:"))])


@pytest.mark.background(COLD_CACHE_RUN, FORK)
def test_forked_child_can_use_fastbn():
    """GNU OpenMP kills a forked child at its first parallel launch; fastbn must detect the
    fork and run serial kernels there (and stay parallel on fork-safe layers)."""
    layer, serial = COLD_CACHE_RUN.output(FORK).split()
    assert serial == str(layer == "omp")


@pytest.mark.background(NO_CACHE_RUN, "no-cache")
def test_unusable_cache_dir_does_not_break_import_or_calls():
    """No writable cache location at all (``_cold_cache.NO_CACHE_SCRIPT``: NUMBA_CACHE_DIR
    under a regular file, a copy of the package whose __pycache__ dirs are files, HOME and
    XDG_CACHE_HOME unusable too): import and calls must still work.  (A cache directory
    that does not exist yet is created: ``test_main.test_warmup_fills_the_disk_cache``.)"""
    output = NO_CACHE_RUN.output("no-cache")
    assert "NO_CACHE True True" in output.splitlines(), output

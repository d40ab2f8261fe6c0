"""Every CUDA kernel compiles for a real GPU (sm_90 PTX), without a GPU.

The simulator runs kernels as Python, so it cannot catch what only Numba's CUDA
compiler rejects (typing and lowering in the CUDA target, NVVM).  Compiling to PTX
needs only libNVVM from a CUDA toolkit, no driver or device; skipped without one.
Each kernel is compiled for every input dtype and every argument dtype it is
launched with (statistics float32/float64; eval passes running statistics).
"""

import numba
import numpy as np
import pytest

if numba.config.ENABLE_CUDASIM:
    pytest.skip("compiles for the real CUDA target (the simulator is on)", allow_module_level=True)

from numba import cuda, typeof  # noqa: E402

COMPUTE_CAPABILITY = (9, 0)


@pytest.fixture(scope="module")
def compile_ptx():
    """compile_ptx(kernel, *example_args) -> PTX text; skips without libNVVM."""
    try:
        cuda.compile_ptx(lambda a: None, numba.void(typeof(np.zeros(1))), cc=COMPUTE_CAPABILITY)
    except Exception as error:  # no CUDA toolkit: nothing to compile with
        pytest.skip(f"libNVVM unavailable: {type(error).__name__}: {error}")
    import numba.cuda.dispatcher as dispatcher

    class TargetDevice:
        compute_capability = COMPUTE_CAPABILITY

    # Device functions ask the current device for its compute capability, which needs
    # a driver; answer for the target instead.
    saved = dispatcher.get_current_device
    dispatcher.get_current_device = TargetDevice
    try:
        def compile_kernel(kernel, *args):
            signature = numba.void(*(typeof(a) for a in args))
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=COMPUTE_CAPABILITY)
            return ptx
        yield compile_kernel
    finally:
        dispatcher.get_current_device = saved


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_kernel_compiles_to_ptx(compile_ptx, dtype):
    from fastbn.cuda.dtypes import accumulator_dtype, compute_dtype
    from fastbn.cuda.finalize import finalize_kernels
    from fastbn.cuda.nchw import nchw_kernels
    from fastbn.cuda.nhwc import nhwc_kernels
    from fastbn.cuda.welford import merge_stat_partials, merge_sum_partials

    dtype = np.dtype(dtype)
    x = np.zeros(60, dtype)
    partials = np.zeros((4, 3))
    statistics = np.zeros(4, accumulator_dtype(dtype))
    vector = np.zeros(4, compute_dtype(dtype))
    nchw, nhwc = nchw_kernels(dtype), nhwc_kernels(dtype)
    forward_finalize, backward_finalize = finalize_kernels(dtype)

    ptx = compile_ptx(nchw.stats_partials, x, 4, 5, 3, partials, partials, partials)
    assert "shfl.sync.down" in ptx  # the warp merge uses shuffles
    compile_ptx(nhwc.stats_partials, x, 4, 3, partials, partials, partials)
    compile_ptx(nchw.scale_shift, x, 4, 5, vector, vector, vector, x)
    compile_ptx(nhwc.scale_shift, x, 4, vector, vector, vector, x)
    compile_ptx(nchw.backward_dx, x, x, 4, 5, vector, vector, vector, vector, x)
    compile_ptx(nhwc.backward_dx, x, x, 4, vector, vector, vector, vector, x)
    for saved_mean in (np.zeros(4, np.float32), np.zeros(4, np.float64)):
        compile_ptx(nchw.backward_reduce, x, x, saved_mean, 4, 5, 3, partials, partials)
        compile_ptx(nhwc.backward_reduce, x, x, saved_mean, 4, 3, partials, partials)
        compile_ptx(backward_finalize, statistics, statistics, saved_mean, saved_mean, vector, True,
                    True, 10.0, vector, vector, vector, vector, vector, vector)
    for mean_var in (statistics, vector):  # training: batch statistics; eval: running ones
        compile_ptx(forward_finalize, mean_var, mean_var, vector, vector, True, False, 1e-5, True,
                    True, 0.1, 10.0, vector, vector, statistics, statistics, vector, vector, vector)
    compile_ptx(merge_stat_partials, partials, partials, partials, statistics, statistics)
    compile_ptx(merge_sum_partials, partials, partials, statistics, statistics)

"""The GPU path's ordering and cost contract, checked on the simulator by watching the
launch path: every launch goes to the caller's stream, no call waits on the host, no
scratch is allocated in steady state, and a call makes few launches.

Runs where tests/cuda runs; shapes are tiny, so the launch configuration is forced
small enough that reductions take several blocks per channel (the last-block merge).
"""

import sys
import types

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

import fastbn  # noqa: E402
from fastbn import reference  # noqa: E402
from fastbn.cuda import launch_config, launching, streams, workspace  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

#: Several blocks per channel in both families, two warps per block.
MANY_BLOCKS = dict(threads_per_block=64, max_blocks=64, values_per_block=40)
SHAPE = (3, 4, 5, 6)


@pytest.fixture
def launches(monkeypatch):
    """A list that receives (kernel name, stream) for every launch."""
    seen = []
    real = launching.launch

    def recording(kernel, grid, block, stream, *args, **kwargs):
        name = getattr(kernel, "py_func", kernel).__name__
        seen.append((name, stream))
        real(kernel, grid, block, stream, *args, **kwargs)

    monkeypatch.setattr(launching, "launch", recording)
    return seen


def _case(rng, layout="NCHW", dtype=np.float32):
    shape = SHAPE if layout == "NCHW" else (SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[1])
    c = SHAPE[1]
    return dict(x=(3 + rng.standard_normal(shape)).astype(dtype), dy=rng.standard_normal(shape).astype(dtype),
                weight=(1 + rng.random(c)).astype(dtype), bias=rng.standard_normal(c).astype(dtype),
                running_mean=rng.standard_normal(c).astype(dtype), running_var=(0.5 + rng.random(c)).astype(dtype))


def _device(case):
    return {k: cuda.to_device(v) for k, v in case.items()}


def _train_step(d, layout="NCHW", out=None):
    y, mean, invstd = fastbn.batch_norm_forward(d["x"], d["weight"], d["bias"], running_mean=d["running_mean"],
                                                running_var=d["running_var"], layout=layout, out=out)
    dx, dw, db = fastbn.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["weight"], layout=layout)
    return y, dx, dw, db


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_every_launch_goes_to_the_stream_set_for_numba_arrays(rng, launches, layout):
    d = _device(_case(rng, layout))
    s = cuda.stream()
    with launch_config.override(**MANY_BLOCKS):
        with fastbn.cuda.stream(s):
            _train_step(d, layout)
            fastbn.batch_norm_forward(d["x"], d["weight"], d["bias"], running_mean=d["running_mean"],
                                      running_var=d["running_var"], training=False, layout=layout)
        assert launches and all(stream is s for _, stream in launches), launches
        launches.clear()
        _train_step(d, layout)
    assert launches and all(stream is streams.default_stream() for _, stream in launches), launches


def test_stream_setting_is_per_thread_and_nests():
    a, b = cuda.stream(), cuda.stream()
    assert streams.current() is streams.default_stream()
    with fastbn.cuda.stream(a):
        with fastbn.cuda.stream(b):
            assert streams.current() is b
        assert streams.current() is a
        seen = []
        import threading
        t = threading.Thread(target=lambda: seen.append(streams.current()))
        t.start()
        t.join()
        assert seen == [streams.default_stream()]
    assert streams.current() is streams.default_stream()


def test_torch_and_cupy_arrays_run_on_their_library_current_stream(monkeypatch):
    """Fake torch / CuPy modules stand in for the real ones (no CUDA torch here)."""
    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = types.SimpleNamespace(current_stream=lambda device: types.SimpleNamespace(cuda_stream=0x1234))
    fake_cupy = types.ModuleType("cupy")

    class _CupyStream:
        ptr = 0x5678

    fake_cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: _CupyStream(),
                                           Device=lambda i: _NullContext())
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    tensor = type("Tensor", (), {"__module__": "torch", "device": types.SimpleNamespace(index=0)})()
    array = type("ndarray", (), {"__module__": "cupy", "device": types.SimpleNamespace(id=0)})()
    assert streams.for_array(tensor).handle == 0x1234
    assert streams.for_array(tensor) is streams.for_array(tensor)  # wrapped once, cached
    assert streams.for_array(array).handle == 0x5678


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def host_syncs(monkeypatch):
    """A list that receives every synchronizing host operation a call makes: copies
    between host and device, numba's setitem copy from host code, cuda.synchronize."""
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator.cudadrv import devicearray

    seen = []

    def watch(cls, name):
        real = getattr(cls, name)

        def watched(self, *args, **kwargs):
            if sim_kernel._get_kernel_context() is None:  # host code, not a simulated thread
                seen.append(name)
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, watched)

    for name in ("copy_to_host", "copy_to_device", "__setitem__"):
        watch(devicearray.FakeCUDAArray, name)
    real_sync = cuda.synchronize
    monkeypatch.setattr(cuda, "synchronize", lambda: (seen.append("synchronize"), real_sync())[1])
    return seen


@pytest.mark.skipif(not SIMULATOR, reason="watches the simulator's device arrays")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_no_call_synchronizes_the_host_even_with_strided_copies(rng, host_syncs, layout):
    case = _case(rng, layout)
    d = _device(case)
    # Non-dense x (a strided slice) and non-dense out: both go through the copy kernel.
    wide = cuda.to_device(np.repeat(case["x"], 2, axis=-1))
    out_wide = cuda.device_array(wide.shape, wide.dtype)
    x_strided, out_strided = wide[..., ::2], out_wide[..., ::2]
    host_syncs.clear()
    with launch_config.override(**MANY_BLOCKS):
        y, mean, invstd = fastbn.batch_norm_forward(x_strided, d["weight"], d["bias"], layout=layout,
                                                    out=out_strided)
        dx, dw, db = fastbn.batch_norm_backward(d["dy"], x_strided, mean, invstd, d["weight"], layout=layout)
    assert host_syncs == []
    y_ref, _, _ = reference.batch_norm_forward(case["x"], case["weight"], case["bias"], layout=layout)
    np.testing.assert_allclose(out_wide.copy_to_host()[..., ::2], y_ref, rtol=1e-5, atol=1e-5)
    dx_ref, _, _ = reference.batch_norm_backward(case["dy"], case["x"], mean.copy_to_host(),
                                                 invstd.copy_to_host(), case["weight"], layout=layout)
    np.testing.assert_allclose(dx.copy_to_host(), dx_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_no_scratch_allocation_in_steady_state(rng, monkeypatch, layout):
    d = _device(_case(rng, layout))
    allocations = []
    real = cuda.device_array

    def counting(*args, **kwargs):
        allocations.append(sys._getframe(1).f_globals["__name__"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cuda, "device_array", counting)
    workspace.clear()
    with launch_config.override(**MANY_BLOCKS):
        _train_step(d, layout)  # first call: the workspace fills
        assert "fastbn.cuda.workspace" in allocations
        allocations.clear()
        for _ in range(2):
            _train_step(d, layout)
    assert "fastbn.cuda.workspace" not in allocations
    # What remains are the results (numba input: numba's allocator).
    assert set(allocations) <= {"fastbn.cuda.arrays"}


def _launch_counts(d, launches, layout):
    counts = {}
    launches.clear()
    y, mean, invstd = fastbn.batch_norm_forward(d["x"], d["weight"], d["bias"], running_mean=d["running_mean"],
                                                running_var=d["running_var"], layout=layout)
    counts["training forward"] = len(launches)
    launches.clear()
    fastbn.batch_norm_forward(d["x"], d["weight"], d["bias"], running_mean=d["running_mean"],
                              running_var=d["running_var"], training=False, layout=layout)
    counts["eval forward"] = len(launches)
    launches.clear()
    fastbn.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["weight"], layout=layout)
    counts["backward"] = len(launches)
    return counts


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_launches_per_call(rng, launches, layout):
    d = _device(_case(rng, layout))
    with launch_config.override(**MANY_BLOCKS):
        _train_step(d, layout)  # warm: the workspace's one-time zeroing launches are done
        counts = _launch_counts(d, launches, layout)
    assert counts == LAUNCHES, counts


#: Launches per public call on dense input (several blocks per channel).
LAUNCHES = {"training forward": 2, "eval forward": 1, "backward": 2}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_elementwise_cursors_advance_across_planes_and_channels(rng, layout):
    """One block of one warp: each thread's four cursors loop several times (a step of
    128 values crosses planes of 30 and wraps the 4 channels), then finish in the tail."""
    case = _case(rng, layout, np.float64)
    d = _device(case)
    with launch_config.override(threads_per_block=32, max_blocks=1, values_per_block=1 << 20):
        y, mean, invstd, = fastbn.batch_norm_forward(d["x"], d["weight"], d["bias"], layout=layout)
        dx, _, _ = fastbn.batch_norm_backward(d["dy"], d["x"], mean, invstd, d["weight"], layout=layout)
        y_eval, _, _ = fastbn.batch_norm_forward(d["x"], d["weight"], d["bias"], running_mean=d["running_mean"],
                                                 running_var=d["running_var"], training=False, layout=layout)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(case["x"], case["weight"], case["bias"],
                                                               layout=layout)
    dx_ref, _, _ = reference.batch_norm_backward(case["dy"], case["x"], mean_ref, invstd_ref, case["weight"],
                                                 layout=layout)
    rm, rv = case["running_mean"].copy(), case["running_var"].copy()
    y_eval_ref, _, _ = reference.batch_norm_forward(case["x"], case["weight"], case["bias"], running_mean=rm,
                                                    running_var=rv, training=False, layout=layout)
    np.testing.assert_allclose(y.copy_to_host(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx.copy_to_host(), dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y_eval.copy_to_host(), y_eval_ref, rtol=1e-12, atol=1e-12)


def test_eval_with_too_many_channels_for_shared_memory_takes_two_launches(rng, launches):
    """float64 coefficients of 2049 channels exceed 48 KiB of shared memory: the eval
    forward computes them in a kernel of their own first, with the same result."""
    c = 2049
    x = rng.standard_normal((2, c))
    weight, bias = 1 + rng.random(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), 0.5 + rng.random(c)
    with launch_config.override(threads_per_block=1024, max_blocks=2):
        y, mean, invstd = fastbn.batch_norm_forward(
            cuda.to_device(x), cuda.to_device(weight), cuda.to_device(bias), running_mean=cuda.to_device(rm),
            running_var=cuda.to_device(rv), training=False)
    assert [name for name, _ in launches] == ["forward_coefficients", "apply"]
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(x, weight, bias, running_mean=rm.copy(),
                                                               running_var=rv.copy(), training=False)
    np.testing.assert_allclose(y.copy_to_host(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(mean.copy_to_host(), mean_ref)
    np.testing.assert_allclose(invstd.copy_to_host(), invstd_ref, rtol=1e-15)

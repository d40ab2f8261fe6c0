"""The CUDA backend's dispatch and argument errors: host and device arrays are not
mixed, dtypes are named, checks run before device work; the launch configuration."""

import numba
import numpy as np
import pytest
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if not (SIMULATOR or cuda.is_available()):
    pytest.skip("numba.cuda has neither a GPU nor the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

from _cuda_checks import BFLOAT16, device, host, make_case  # noqa: E402

import fastbn  # noqa: E402
from fastbn.cuda import launch_config  # noqa: E402


def test_mixing_host_and_device_arrays_names_the_argument(rng):
    case = make_case(rng, (3, 4, 5, 6), "NCHW", np.float32)
    d_x = device(case["x"])
    with pytest.raises(TypeError, match=r"^weight: expected a CUDA device array like x"):
        fastbn.batch_norm_forward(d_x, case["weight"])
    with pytest.raises(TypeError, match=r"^running_var: expected a CUDA device array like x"):
        fastbn.batch_norm_forward(d_x, running_mean=device(case["running_mean"]),
                                  running_var=case["running_var"])
    with pytest.raises(TypeError, match=r"^save_mean: expected a CUDA device array like dy"):
        fastbn.batch_norm_backward(d_x, d_x, np.zeros(4), device(np.ones(4)))
    with pytest.raises(TypeError, match=r"^x: expected a CUDA device array like dy"):
        fastbn.batch_norm_backward(d_x, case["x"], device(np.zeros(4)), device(np.ones(4)))
    # A host x with a device out: the host side decides, out is named.
    with pytest.raises(TypeError, match=r"^out: expected a numpy.ndarray like x"):
        fastbn.batch_norm_forward(case["x"], out=d_x)


def test_float16_parameters_must_be_float32(rng):
    case = make_case(rng, (3, 4, 5, 6), "NCHW", np.float16)
    with pytest.raises(TypeError, match=r"^weight: expected dtype float32, got float16"):
        fastbn.batch_norm_forward(device(case["x"]), device(case["weight"].astype(np.float16)))
    if BFLOAT16 is not None:
        with pytest.raises(TypeError, match=r"^bias: expected dtype float32, got bfloat16"):
            fastbn.batch_norm_forward(device(case["x"].astype(BFLOAT16)), device(case["weight"]),
                                      device(case["bias"].astype(BFLOAT16)))
    with pytest.raises(TypeError, match=r"^save_mean: expected dtype float32 or float64, got float16"):
        fastbn.batch_norm_backward(device(case["dy"]), device(case["x"]),
                                   device(np.zeros(4, np.float16)), device(np.ones(4, np.float32)))


def test_int16_device_arrays_are_not_taken_for_bfloat16():
    """bfloat16 on the device is named by its dtype (ml_dtypes.bfloat16 arrays, torch.bfloat16
    tensors); an int16 array is integers, refused like any other non-float dtype."""
    with pytest.raises(TypeError, match=r"^x: expected dtype float32 or float64 or float16 or bfloat16, got int16$"):
        fastbn.batch_stats(device(np.ones((2, 3), np.int16)))


def test_integer_views_are_refused_on_the_host(rng):
    """The kernels' 16-bit views (uint16, int16) are not storage dtypes a caller may pass."""
    for dtype in (np.int16, np.uint16):
        with pytest.raises(TypeError, match=r"^x: expected dtype float32 or float64 or float16"):
            fastbn.batch_stats(np.ones((2, 3), dtype=dtype))


def test_checks_run_before_any_device_work(rng):
    case = make_case(rng, (3, 4, 5, 6), "NCHW", np.float32)
    d_rm, d_rv = device(case["running_mean"]), device(case["running_var"])
    with pytest.raises(ValueError, match=r"^momentum: expected a number in \[0.0, 1.0\]"):
        fastbn.batch_norm_forward(device(case["x"]), running_mean=d_rm, running_var=d_rv, momentum=2.0)
    np.testing.assert_array_equal(host(d_rm), case["running_mean"])
    np.testing.assert_array_equal(host(d_rv), case["running_var"])


def test_unavailable_cuda_is_a_clear_error(monkeypatch, rng):
    import fastbn.cuda as backend
    monkeypatch.setattr(backend, "SIMULATOR", False)
    monkeypatch.setattr(backend._cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="numba.cuda cannot use a GPU"):
        fastbn.batch_stats(device(np.ones((2, 3))))


def test_launch_config_override_validates_and_restores():
    before = (launch_config.threads_per_block, launch_config.max_blocks, launch_config.values_per_block)
    with pytest.raises(ValueError, match="threads_per_block"):
        with launch_config.override(threads_per_block=48):
            pass
    with pytest.raises(TypeError, match="no field"):
        with launch_config.override(blocks=3):
            pass
    with launch_config.override(max_blocks=7):
        assert launch_config.max_blocks == 7
    assert (launch_config.threads_per_block, launch_config.max_blocks, launch_config.values_per_block) == before


def test_describe():
    description = fastbn.cuda.describe()
    if SIMULATOR:
        assert description == "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    else:
        assert isinstance(description, str) and "compute capability" in description


@pytest.mark.skipif(SIMULATOR, reason="torch tensors need a real GPU")
def test_torch_bfloat16_tensors_run_and_come_back_as_bfloat16():
    """torch.bfloat16 CUDA tensors (exported as opaque 2-byte items) run as bfloat16, in
    both memory formats; results are torch tensors, y and dx bfloat16 within one bfloat16
    rounding (2**-9 relative, 2**-8 here for the statistics' float32 sums) of torch's
    float32 computation on the same values."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = (3 + torch.randn(3, 4, 5, 6, device="cuda")).to(torch.bfloat16).contiguous(memory_format=memory_format)
        dy = torch.randn(3, 4, 5, 6, device="cuda").to(torch.bfloat16)
        y, mean, invstd = fastbn.batch_norm_forward(x)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and mean.dtype == torch.float32
        xg = x.float().requires_grad_(True)
        y_ref = torch.nn.functional.batch_norm(xg, None, None, training=True)
        (dx_ref,) = torch.autograd.grad(y_ref, xg, dy.float())
        assert (y.float() - y_ref).abs().max().item() <= 2.0 ** -8 * y_ref.abs().max().item()
        dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd)
        assert dx.dtype == torch.bfloat16 and dweight.dtype == torch.float32
        assert (dx.float() - dx_ref).abs().max().item() <= 2.0 ** -8 * dx_ref.abs().max().item()

"""float16/bfloat16 CPU tensors through fastbn.torch: zero-copy 16-bit views, float32
parameters and statistics (torch's mixed precision), whole 16-bit modules, CPU autocast,
and the operators' fake kernels.

torch's own CPU batch norm computes 16-bit input in float32 and rounds the result once,
as fastbn does, so the two agree to within one unit in the last place of the storage
dtype (two float32 evaluations ~1e-6 apart can round to neighbouring 16-bit values):
``rtol = eps(storage)`` with an ``atol`` of one ulp at the outputs' unit scale.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")  # NumPy's bfloat16, which bfloat16 CPU tensors need

import fastbn.torch as fastbn_torch  # noqa: E402
from fastbn.torch import _ops  # noqa: E402
from torch import nn  # noqa: E402

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _one_ulp(dtype):
    """Tolerances of one storage ulp (see the module docstring)."""
    eps = torch.finfo(dtype).eps
    return {"rtol": eps, "atol": eps}


def _pair(dtype=None, num_features=4):
    ours, native = fastbn_torch.BatchNorm2d(num_features), nn.BatchNorm2d(num_features)
    with torch.no_grad():
        for module in (ours, native):
            module.weight.copy_(torch.linspace(0.5, 2.0, num_features))
            module.bias.copy_(torch.linspace(-1.0, 1.0, num_features))
    if dtype is not None:
        ours, native = ours.to(dtype), native.to(dtype)
    return ours, native


@pytest.mark.parametrize("dtype", HALF)
def test_tensors_reach_the_kernels_as_16_bit_views_without_a_copy(dtype):
    t = torch.randn(4, 3, 5, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    array = _ops._as_fastbn_array(t)
    assert array.dtype.name == str(dtype).removeprefix("torch.") and array.itemsize == 2
    assert array.__array_interface__["data"][0] == t.data_ptr()
    assert array.strides == tuple(2 * s for s in t.stride())
    back = _ops._as_tensor(array, t.device)
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr()


# The one-call small path and the parallel kernels; bfloat16 without the parallel row
# kernels (channels_last beyond the small path), as in test_half_batch_norm.py.
@pytest.mark.parametrize("dtype, memory_format, shape", [
    (dtype, memory_format, shape) for dtype in HALF for memory_format in (torch.contiguous_format, torch.channels_last)
    for shape in ((4, 4, 5, 5), (8, 4, 72, 72))
    if (dtype, memory_format, shape) != (torch.bfloat16, torch.channels_last, (8, 4, 72, 72))],
    ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, tuple) else "x".join(map(str, v)))
def test_mixed_precision_matches_torch(dtype, memory_format, shape):
    """16-bit input, float32 parameters and running statistics: train and eval, forward
    and backward, against torch's own batch norm on the same input."""
    ours, native = _pair()
    x = (torch.randn(shape) * 3 + 5).to(dtype).contiguous(memory_format=memory_format)
    for training in (True, False):
        ours.train(training), native.train(training)
        xo, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, expected = ours(xo), native(xn)
        assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(y, expected, **_one_ulp(dtype))
        dy = torch.randn(shape).to(dtype)
        y.backward(dy)
        expected.backward(dy)
        assert xo.grad.dtype == dtype and ours.weight.grad.dtype == torch.float32
        torch.testing.assert_close(xo.grad, xn.grad, **_one_ulp(dtype))
        # torch rounds some 16-bit parameter gradients to the storage dtype (channels_last
        # bfloat16); fastbn's are float32 roundings of float64 sums: compare with those.
        x64, dy64 = x.double(), dy.double()
        if training:
            mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = ours.running_mean.double(), ours.running_var.double()
        x_hat = (x64 - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + ours.eps).sqrt()
        torch.testing.assert_close(ours.bias.grad.double(), dy64.sum(dim=(0, 2, 3)), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad.double(), (dy64 * x_hat).sum(dim=(0, 2, 3)), rtol=1e-6,
                                   atol=1e-5)
        ours.zero_grad(), native.zero_grad()
    assert ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(ours.state_dict(), native.state_dict(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_whole_16_bit_module(dtype):
    """``module.to(dtype)``: 16-bit parameters and running statistics, updated and
    differentiated like torch's."""
    ours, native = _pair(dtype)
    x = torch.randn(6, 4, 5, 5).to(dtype)
    xo, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = ours(xo), native(xn)
    torch.testing.assert_close(y, expected, **_one_ulp(dtype))
    dy = torch.randn(x.shape).to(dtype)
    y.backward(dy)
    expected.backward(dy)
    assert ours.weight.grad.dtype == ours.running_var.dtype == dtype
    # torch's all-16-bit path rounds its own way (16-bit parameters in its arithmetic):
    # measured up to 1.5 ulps apart over 12 seeds, so two ulps.
    torch.testing.assert_close(xo.grad, xn.grad, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(ours.weight.grad, native.weight.grad, rtol=2 * torch.finfo(dtype).eps, atol=0.5)
    torch.testing.assert_close(ours.state_dict(), native.state_dict(), **_one_ulp(dtype))


def test_conv_bn_under_cpu_autocast_matches_torch():
    """Conv -> BN -> ReLU under ``torch.autocast("cpu", bfloat16)``: the convolution
    runs in bfloat16, batch norm gets bfloat16 input with float32 parameters, as in torch."""
    torch.manual_seed(0)
    native = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    ours = fastbn_torch.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    ours.load_state_dict(native.state_dict())
    x = torch.randn(4, 3, 12, 12)
    outputs = []
    for model in (ours, native):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        outputs.append(y)
    assert outputs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[0], outputs[1], **_one_ulp(torch.bfloat16))
    torch.testing.assert_close(ours.state_dict(), native.state_dict(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours.parameters(), native.parameters()):
        assert a.grad.dtype == torch.float32
        # the conv's weight gradient goes through bfloat16 dx: a bfloat16 rounding apart
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-2 * float(b.grad.abs().max()))


@pytest.mark.parametrize("dtype", HALF)
def test_fake_kernels_give_the_real_dtypes(dtype):
    """The compiler's fake kernels: 16-bit y/dx, float32 statistics and dweight/dbias."""
    x = torch.randn(4, 3, 5, 5).to(dtype)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    torch.library.opcheck(torch.ops.fastbn.batch_norm.default, (x, w, b, rm, rv, True, 0.1, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))
    _, mean, invstd, _, _ = torch.ops.fastbn.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
    assert mean.dtype == invstd.dtype == torch.float32
    dy = torch.randn(4, 3, 5, 5).to(dtype)
    torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default, (dy, x, mean, invstd, w, True),
                          test_utils=("test_schema", "test_faketensor"))
    dx, dweight, _ = torch.ops.fastbn.batch_norm_backward(dy, x, mean, invstd, w, True)
    assert dx.dtype == dtype and dweight.dtype == torch.float32

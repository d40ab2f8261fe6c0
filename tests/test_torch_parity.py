"""fastbn.torch behaves as torch.nn's batch norm where a user can tell: empty batches,
momentum, exception classes, meta tensors, repr, convert of lazy and sync modules, and
the functional API's hint for CPU torch tensors."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn  # noqa: E402
import fastbn.torch as fastbn_torch  # noqa: E402
from torch import nn  # noqa: E402

F64 = torch.float64


def _pair(torch_class, **options):
    native = torch_class(3, dtype=F64, **options)
    ours = fastbn_torch.convert(torch_class(3, dtype=F64, **options))
    ours.load_state_dict(native.state_dict())
    return ours, native


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("torch_class, shape", [(nn.BatchNorm1d, (0, 3)), (nn.BatchNorm1d, (0, 3, 4)),
                                                (nn.BatchNorm2d, (0, 3, 2, 2)),
                                                (nn.BatchNorm3d, (0, 3, 1, 2, 2))])
def test_empty_batch_like_torch(training, torch_class, shape):
    ours, native = _pair(torch_class)
    ours.train(training)
    native.train(training)
    x = torch.randn(shape, dtype=F64)
    xo, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = ours(xo), native(xn)
    assert y.shape == expected.shape == x.shape
    y.sum().backward()
    expected.sum().backward()
    assert xo.grad.shape == x.shape
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, getattr(native, name).grad)
    torch.testing.assert_close(ours.state_dict(), native.state_dict())


@pytest.mark.parametrize("momentum", [None, 0.0, 1.0, 1.5, -0.25])
def test_any_momentum_torch_accepts(momentum):
    ours, native = _pair(nn.BatchNorm2d, momentum=momentum)
    for _ in range(2):
        x = torch.randn(4, 3, 2, 2, dtype=F64)
        torch.testing.assert_close(ours(x), native(x))
    torch.testing.assert_close(ours.state_dict(), native.state_dict())


@pytest.mark.parametrize("momentum", [float("nan"), 7.0, -3.0])
def test_momentum_unused_in_eval_is_not_validated(momentum):
    ours, native = _pair(nn.BatchNorm2d)
    ours.eval()
    native.eval()
    ours.momentum = native.momentum = momentum
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    torch.testing.assert_close(ours(x), native(x))


@pytest.mark.parametrize("make_input", [
    lambda: torch.randn(4, 5, 2, 2, dtype=F64),  # wrong channel count
    lambda: torch.randint(0, 5, (4, 3, 2, 2)),   # integer dtype
])
def test_exception_class_is_torchs(make_input):
    ours, native = _pair(nn.BatchNorm2d)
    x = make_input()
    with pytest.raises(Exception) as native_error:
        native(x)
    with pytest.raises(Exception) as our_error:
        ours(x)
    assert isinstance(our_error.value, type(native_error.value))


def test_one_value_per_channel_is_valueerror_like_torch():
    ours, native = _pair(nn.BatchNorm1d)
    x = torch.randn(1, 3, dtype=F64)
    with pytest.raises(ValueError):
        native(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(x)


def test_meta_tensors_give_shapes():
    module = fastbn_torch.BatchNorm2d(3, device="meta")
    y = module(torch.empty(4, 3, 2, 2, device="meta").contiguous(memory_format=torch.channels_last))
    assert y.device.type == "meta" and y.shape == (4, 3, 2, 2)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_repr_names_fastbn():
    converted = fastbn_torch.convert(nn.Sequential(nn.BatchNorm2d(64)))
    assert repr(converted[0]) == repr(nn.BatchNorm2d(64))[:-1] + ", backend=fastbn)"


def test_convert_lazy_modules():
    model = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="forward pass"):
        fastbn_torch.convert(model)
    model(torch.randn(2, 3, 2, 2))  # materialized: now a BatchNorm2d
    converted = fastbn_torch.convert(model)
    assert isinstance(converted[0], fastbn_torch.BatchNorm2d) and converted[0].num_features == 3


def test_convert_leaves_sync_batchnorm():
    model = nn.Sequential(nn.SyncBatchNorm(3))
    assert type(fastbn_torch.convert(model)[0]) is nn.SyncBatchNorm


def test_functional_api_names_fastbn_torch_for_cpu_tensors():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"fastbn\.torch.*\.numpy\(\)"):
        fastbn.batch_norm(x, training=True)
    np.testing.assert_allclose(fastbn.batch_norm(x.numpy(), training=True),
                               nn.functional.batch_norm(x, None, None, training=True).numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_half_precision_stopgap_like_torch(dtype, memory_format):
    """float16/bfloat16 CPU input with float32 parameters (torch's mixed precision):
    output in the input's dtype and memory format; running statistics and parameter
    gradients float32, equal to torch's up to rounding of the float32 computation."""
    ours, native = fastbn_torch.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2).to(dtype).contiguous(memory_format=memory_format)
    xo, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = ours(xo), native(xn)
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y, expected)
    y.float().square().sum().backward()
    expected.float().square().sum().backward()
    assert xo.grad.dtype == dtype
    torch.testing.assert_close(xo.grad, xn.grad)
    torch.testing.assert_close(ours.weight.grad, native.weight.grad)
    torch.testing.assert_close(ours.state_dict(), native.state_dict())


def test_cpu_autocast_bfloat16():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), fastbn_torch.BatchNorm2d(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(4, 3, 2, 2))
    assert y.dtype == torch.bfloat16 and model[1].running_mean.dtype == torch.float32

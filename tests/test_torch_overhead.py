"""The eager path of fastbn.torch without its former copies: running statistics updated
in place by the kernels (same tensors, version counter bumped, nothing touched on
failure), the operator still functional, eval statistics never aliasing the running
buffers, results with ``torch.empty_like(x)``'s strides, parameter gradients that
accumulate as torch's."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fastbn_torch  # noqa: E402
from fastbn.torch import _ops  # noqa: E402

F64 = torch.float64


def _pair(momentum):
    gen = torch.Generator().manual_seed(0)
    ours = fastbn_torch.BatchNorm2d(3, momentum=momentum, dtype=F64)
    native = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=F64)
    with torch.no_grad():
        for module in (ours, native):
            module.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=F64))
            module.running_var.copy_(torch.tensor([2.0, 0.5, 1.0], dtype=F64))
    # Adversarial offsets: a large mean per channel, one channel constant.
    x = torch.randn(4, 3, 2, 3, generator=gen, dtype=F64) + torch.tensor([1e4, -3.0, 0.0], dtype=F64).view(1, 3, 1, 1)
    x[:, 2] = 7.0
    return ours, native, x


@pytest.mark.parametrize("momentum", [0.1, None, 1.5])
@pytest.mark.parametrize("grad", [False, True])
def test_running_statistics_updated_in_place_as_torch(momentum, grad):
    ours, native, x = _pair(momentum)
    buffers = (ours.running_mean, ours.running_var)
    pointers = [b.data_ptr() for b in buffers]
    versions = [b._version for b in buffers]
    x = x.requires_grad_(grad)
    for _ in range(3):
        with torch.set_grad_enabled(grad):
            y, y_native = ours(x), native(x)
        torch.testing.assert_close(y, y_native, rtol=1e-9, atol=1e-9)
    assert ours.running_mean is buffers[0] and ours.running_var is buffers[1]
    assert [b.data_ptr() for b in buffers] == pointers
    assert all(b._version > v for b, v in zip(buffers, versions))  # autograd sees the writes
    # Rounding differs only in the update's formula (float64 both ways): a few ulps.
    torch.testing.assert_close(ours.running_mean, native.running_mean, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(ours.running_var, native.running_var, rtol=1e-13, atol=1e-12)
    assert ours.num_batches_tracked.item() == native.num_batches_tracked.item() == 3


def test_failed_call_leaves_the_buffers_as_they_were():
    ours, _, _ = _pair(0.1)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 3, 1, 1, dtype=F64))
    with pytest.raises(RuntimeError, match="float64"):  # weight float64, x float32
        ours(torch.randn(4, 3, 2, 2))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_operator_stays_functional():
    _, _, x = _pair(0.1)
    running_mean, running_var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    y, mean, invstd, new_mean, new_var = torch.ops.fastbn.batch_norm(x, None, None, running_mean, running_var,
                                                                     True, 0.1, 1e-5)
    assert torch.equal(running_mean, torch.zeros(3, dtype=F64)) and torch.equal(running_var, torch.ones(3, dtype=F64))
    eager_mean, eager_var = running_mean.clone(), running_var.clone()
    eager = _ops.batch_norm(x, None, None, eager_mean, eager_var, True, 0.1, 1e-5)
    for a, b in zip((y, mean, invstd, new_mean, new_var), eager + (eager_mean, eager_var)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("through", ["eager", "operator"])
def test_eval_statistics_never_alias_the_running_buffers(monkeypatch, through):
    """Were fastbn to return the running buffers as eval's statistics, the outputs are
    copies (the backward saves them; an operator's outputs must not alias its inputs)."""
    real = _ops.batch_norm_forward

    def returning_the_buffers(x, weight, bias, *, running_mean, running_var, training, **kwargs):
        y, _, _ = real(x, weight, bias, running_mean=running_mean, running_var=running_var, training=training,
                       **kwargs)
        return y, running_mean, running_var  # (not invstd: the aliasing is what counts here)

    monkeypatch.setattr(_ops, "batch_norm_forward", returning_the_buffers)
    running_mean, running_var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    if through == "eager":
        _, mean, invstd = _ops._batch_norm_in_place(x, None, None, running_mean, running_var, False, 0.1, 1e-5)
    else:
        _, mean, invstd, _, _ = torch.ops.fastbn.batch_norm(x, None, None, running_mean, running_var,
                                                            False, 0.1, 1e-5)
    running_mean.add_(5.0)
    running_var.add_(5.0)
    assert torch.equal(mean, torch.zeros(3, dtype=F64)) and torch.equal(invstd, torch.ones(3, dtype=F64))


def test_eval_statistics_are_not_copied_when_fresh():
    running_mean, running_var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    _, mean, invstd = _ops._batch_norm_in_place(torch.randn(4, 3, dtype=F64), None, None, running_mean,
                                                running_var, False, 0.1, 1e-5)
    assert not _ops._overlaps(mean, running_mean) and not _ops._overlaps(invstd, running_var)
    base = torch.zeros(6, dtype=F64)
    assert _ops._overlaps(base[:3], base[2:5]) and not _ops._overlaps(base[:3], base[3:])


@pytest.mark.parametrize("make_x", [
    lambda t: t.contiguous(memory_format=torch.channels_last),
    lambda t: t[:, :, :1, :1].contiguous(memory_format=torch.channels_last),  # size-1 dims: ambiguous strides
    lambda t: t[:, :, ::2],  # not dense: empty_like gives contiguous strides
    lambda t: t.permute(0, 1, 3, 2),  # dense in an order neither NCHW nor NHWC
], ids=["channels_last", "channels_last_1x1", "strided", "permuted"])
@pytest.mark.parametrize("training", [True, False])
def test_results_have_empty_like_strides(make_x, training):
    gen = torch.Generator().manual_seed(1)
    x = make_x(torch.randn(4, 3, 4, 2, generator=gen, dtype=F64)).requires_grad_()
    ours = fastbn_torch.BatchNorm2d(3, dtype=F64).train(training)
    native = torch.nn.BatchNorm2d(3, dtype=F64).train(training)
    y = ours(x)
    assert y.stride() == torch.empty_like(x).stride()
    dy = torch.randn(y.shape, generator=gen, dtype=F64)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.stride() == torch.empty_like(x).stride()
    # Compared with torch in its contiguous form, where both are exact to a few ulps.
    x_native = x.detach().contiguous().requires_grad_()
    y_native = native(x_native)
    (dx_native,) = torch.autograd.grad(y_native, x_native, dy)
    torch.testing.assert_close(y, y_native, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, dx_native, rtol=1e-10, atol=1e-10)


def test_parameter_gradients_accumulate_as_torch():
    """dweight/dbias come straight from fastbn's arrays (no clone): the first backward's
    tensors become .grad, the second adds into them."""
    ours, native, x = _pair(0.1)
    for _ in range(2):
        for module in (ours, native):
            module(x).pow(2).sum().backward()
    for name in ("weight", "bias"):
        a, b = getattr(ours, name).grad, getattr(native, name).grad
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
        assert isinstance(a.numpy(), np.ndarray)


def test_no_graph_without_gradients():
    _, _, x = _pair(0.1)
    weight = torch.ones(3, dtype=F64, requires_grad=True)
    with torch.no_grad():
        y, mean, _ = _ops.batch_norm(x, weight, None, None, None, True, 0.1, 1e-5)
    assert y.grad_fn is None and not y.requires_grad and not mean.requires_grad
    y_graph, _, _ = _ops.batch_norm(x, weight, None, None, None, True, 0.1, 1e-5)
    assert type(y_graph.grad_fn).__name__ == "EagerBatchNormBackward"
    torch.testing.assert_close(y, y_graph.detach(), rtol=0, atol=0)

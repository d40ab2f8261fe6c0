"""Eager calls of fastbn.torch run the kernels through one autograd.Function
(fastbn.torch._ops.EagerBatchNorm) instead of the operator: same numbers, same
gradients, and double backward still goes through the differentiable operator."""

import warnings

import pytest

torch = pytest.importorskip("torch")

from fastbn.torch import _ops  # noqa: E402


def _args(training=True, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 5, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_(requires_grad)
    weight = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
    bias = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
    return x, weight, bias, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), training, 0.1, 1e-5


@pytest.mark.parametrize("training", [True, False])
def test_eager_function_equals_the_operator(training):
    eager_args, op_args = _args(training), _args(training)
    eager = _ops.EagerBatchNorm.apply(*eager_args)
    op = torch.ops.fastbn.batch_norm(*op_args)
    assert type(eager[0].grad_fn).__name__ == "EagerBatchNormBackward"
    for a, b in zip(eager, op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dy = torch.randn_like(eager[0])
    # A loss reaching the saved statistics too: their gradient flows into x in training.
    loss_e = (eager[0] * dy).sum() + eager[1].sum() + eager[2].sum()
    loss_o = (op[0] * dy).sum() + op[1].sum() + op[2].sum()
    grads_e = torch.autograd.grad(loss_e, eager_args[:3])
    grads_o = torch.autograd.grad(loss_o, op_args[:3])
    for a, b in zip(grads_e, grads_o):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_double_backward_through_the_eager_function():
    args = _args()
    y = _ops.batch_norm(*args)[0]
    assert type(y.grad_fn).__name__ == "EagerBatchNormBackward"
    torch.autograd.gradgradcheck(lambda x, w, b: _ops.batch_norm(x, w, b, *args[3:])[0], args[:3])


def test_traced_and_meta_calls_use_the_operator():
    x = torch.empty(4, 3, 2, 2, device="meta")
    assert not _ops._eager(x)
    assert _ops._eager(torch.empty(4, 3, 2, 2))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.empty(4, 3, 2, 2))
        assert not _ops._eager(fake)


def test_jit_trace_records_the_operator():
    from fastbn.torch import BatchNorm2d
    module = BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():  # torch.jit.trace is deprecated in torch 2.13, and warns
        warnings.simplefilter("ignore")  # about the module's Python checks on the input
        traced = torch.jit.trace(module, x)
    assert "fastbn::batch_norm" in str(traced.graph)
    torch.testing.assert_close(traced(x), module(x), rtol=0, atol=0)

"""fastbn.torch.BatchNormAct1d/2d/3d: ``relu(bn(x) + residual)`` against torch's unfused
BatchNorm + add + ReLU, and gradcheck of the fused operator in float64.

Tolerance: in float64 fastbn and torch agree to summation order (~1e-14), so 1e-10; in
float32 a few ulps of each batch norm's statistics (torch accumulates in float32): 1e-4
relative to max(1, |value|), as tests/test_torch.py.
"""

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fastbn_torch  # noqa: E402
from torch import nn  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _close(actual, expected, dtype):
    scale = max(1.0, expected.detach().abs().max().item())
    assert (actual.detach() - expected.detach()).abs().max().item() <= TOL[dtype] * scale


def _pair(cls, torch_cls, dtype, **kwargs):
    fused = cls(5, **kwargs).to(dtype)
    plain = torch_cls(5).to(dtype)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-0.5, 0.5)
        plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("residual_kind", ["none", "separate", "x"])
@pytest.mark.parametrize("training", [True, False])
def test_module_matches_torch_unfused(dtype, memory_format, residual_kind, training):
    fused, plain = _pair(fastbn_torch.BatchNormAct2d, nn.BatchNorm2d, dtype)
    fused.train(training)
    plain.train(training)
    x = (torch.randn(4, 5, 6, 3, dtype=dtype) * 2 + 3).to(memory_format=memory_format).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    r = torch.randn(x.shape, dtype=dtype).to(memory_format=memory_format).requires_grad_()
    r_ref = r.detach().clone().requires_grad_()
    residual, residual_ref = {"none": (None, None), "x": (x, x_ref)}.get(residual_kind, (r, r_ref))
    y = fused(x, residual)
    y_ref = plain(x_ref) + (0 if residual_ref is None else residual_ref)
    y_ref = torch.relu(y_ref)
    _close(y, y_ref, dtype)
    assert y.is_contiguous(memory_format=memory_format)
    dy = torch.randn(x.shape, dtype=dtype)
    y.backward(dy)
    y_ref.backward(dy)
    _close(x.grad, x_ref.grad, dtype)
    _close(fused.weight.grad, plain.weight.grad, dtype)
    _close(fused.bias.grad, plain.bias.grad, dtype)
    if residual_kind == "separate":
        _close(r.grad, r_ref.grad, dtype)
    for key, value in plain.state_dict().items():
        _close(fused.state_dict()[key].double(), value.double(), dtype)


def test_state_dict_keys_and_activation_none():
    fused, plain = _pair(fastbn_torch.BatchNormAct1d, nn.BatchNorm1d, torch.float64, activation=None)
    assert list(fused.state_dict()) == list(plain.state_dict())
    x, r = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    _close(fused(x, r), plain(x) + r, torch.float64)
    with pytest.raises(ValueError, match="^activation: expected None or 'relu'"):
        fastbn_torch.BatchNormAct2d(3, activation="gelu")


@pytest.mark.parametrize("training, relu, residual", [(True, True, True), (True, True, False),
                                                      (True, False, True), (False, True, True)])
def test_gradcheck_float64(training, relu, residual):
    x = (torch.randn(3, 4, 2, 3, dtype=torch.float64) + 2).requires_grad_()
    r = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)

    def fused(x, r, w, b):
        return torch.ops.fastbn.batch_norm_act(x, w, b, None if training else rm, None if training else rv,
                                               r if residual else None, training, 0.1, 1e-5, relu)[0]
    assert torch.autograd.gradcheck(fused, (x, r, w, b))
    # the residual that is x itself: both paths of x's gradient
    assert torch.autograd.gradcheck(lambda x, w, b: fused(x, x, w, b), (x, w, b))


def test_3d_and_eval_fallbacks():
    fused, plain = _pair(fastbn_torch.BatchNormAct3d, nn.BatchNorm3d, torch.float32)
    x = torch.randn(2, 5, 3, 2, 2)
    _close(fused(x, x), torch.relu(plain(x) + x), torch.float32)
    half = x.to(torch.bfloat16)  # not fused: batch norm module, then torch's add and ReLU
    assert fused(half, half).dtype == torch.bfloat16

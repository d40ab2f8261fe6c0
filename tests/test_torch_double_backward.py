"""Second-order gradients through fastbn.torch: the backward pass is differentiable.

Compared with torch.nn.functional.batch_norm in float64, where both are exact up to
summation order (agreement ~1e-13 measured), so 1e-10 relative to the values' scale.
"""

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fastbn_torch  # noqa: E402
from torch import nn  # noqa: E402

F64 = torch.float64


def _close(actual, expected, tol=1e-10):
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= tol * scale


def _pair(module_class, torch_class, training, **options):
    torch.manual_seed(0)
    native = torch_class(3, dtype=F64, **options)
    if native.weight is not None:
        with torch.no_grad():
            native.weight.uniform_(0.5, 1.5)
            native.bias.uniform_(-0.5, 0.5)
    if native.running_mean is not None:
        native.running_mean.uniform_(-0.5, 0.5)
        native.running_var.uniform_(0.5, 1.5)
    ours = fastbn_torch.convert(torch_class(3, dtype=F64, **options))
    ours.load_state_dict(native.state_dict())
    native.train(training)
    ours.train(training)
    return ours, native


CASES = [
    (nn.BatchNorm1d, (6, 3), torch.contiguous_format),
    (nn.BatchNorm2d, (3, 3, 2, 3), torch.contiguous_format),
    (nn.BatchNorm2d, (3, 3, 2, 3), torch.channels_last),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("torch_class, shape, memory_format", CASES)
def test_gradgradcheck(training, torch_class, shape, memory_format):
    ours, _ = _pair(None, torch_class, training)
    weight, bias = ours.weight.detach().clone(), ours.bias.detach().clone()
    x = torch.randn(shape, dtype=F64).contiguous(memory_format=memory_format)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))

    def f(x, weight, bias):
        return torch.func.functional_call(ours, {"weight": weight, "bias": bias}, (x,))

    ours.track_running_stats = False if training else ours.track_running_stats
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradgradcheck_without_affine():
    ours, _ = _pair(None, nn.BatchNorm2d, True, affine=False, track_running_stats=False)
    x = torch.randn(3, 3, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(ours, (x,))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("torch_class, shape, memory_format", CASES)
def test_hessian_vector_products_match_torch(training, torch_class, shape, memory_format):
    ours, native = _pair(None, torch_class, training, track_running_stats=not training)
    x = torch.randn(shape, dtype=F64).contiguous(memory_format=memory_format)
    params = (x, ours.weight.detach().clone(), ours.bias.detach().clone())
    vectors = tuple(torch.randn_like(p) for p in params)

    def loss(module):
        def f(x, weight, bias):
            y = torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))
            return (y ** 3).sum() + (y * x).sum()
        return f

    _, ours_hvp = torch.autograd.functional.hvp(loss(ours), params, vectors)
    _, native_hvp = torch.autograd.functional.hvp(loss(native), params, vectors)
    for a, e in zip(ours_hvp, native_hvp):
        _close(a, e)
    hessian = torch.autograd.functional.hessian(lambda x: (ours(x) ** 3).sum(), x)
    expected = torch.autograd.functional.hessian(lambda x: (native(x) ** 3).sum(), x)
    assert expected.abs().max() > 1  # not trivially zero
    _close(hessian, expected)


@pytest.mark.parametrize("training", [True, False])
def test_gradient_penalty_matches_torch(training):
    """Penalty on the input gradient, create_graph=True: every parameter's gradient
    (the layer before, the batch norm, the layer after) matches torch's."""
    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                             nn.Conv2d(3, 1, 1)).double().train(training)

    native, ours = model(), fastbn_torch.convert(model())
    x = torch.randn(4, 2, 3, 3, dtype=F64)
    for net in (native, ours):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(net(xi).sum(), xi, create_graph=True)
        (gx.square().sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), native.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # only the last bias has none
        if q.grad is not None:
            _close(p.grad, q.grad)
    assert ours[1].weight.grad is not None and ours[0].weight.grad is not None


def test_third_order_is_differentiable():
    """Third order: gradgradcheck of the first derivative (finite differences of the
    Hessian).  Not compared with torch: with batch statistics, y does not change when a
    channel is shifted by a constant, so d/dx sum(d/dx sum(grad^2)) is 0, which fastbn
    gives and torch 2.13's third derivative does not."""
    ours = fastbn_torch.BatchNorm1d(2, dtype=F64, track_running_stats=False)
    x = torch.randn(5, 2, dtype=F64, requires_grad=True)

    def first_derivative(x):
        return torch.autograd.grad((ours(x) ** 3).sum(), x, create_graph=True)[0]

    assert torch.autograd.gradgradcheck(first_derivative, (x,))


# torch.func.jvp's first call scripts a helper with torch.jit (torch's own warning).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_over_reverse_matches_torch(training, affine):
    """jvp of the gradient (forward mode through the backward operator) and
    torch.func.hessian (jacfwd over jacrev), over x, weight and bias flattened into one
    vector z, against torch's Hessian.

    torch 2.13's Hessian is not symmetric in training with a weight: its d/dx of the
    weight gradient disagrees with its d/dweight of the x gradient, which finite
    differences confirm; the expected Hessian takes that block from the transpose of
    the latter."""
    ours, native = _pair(None, nn.BatchNorm2d, training, affine=affine, track_running_stats=not training)
    x = torch.randn(3, 3, 2, 2, dtype=F64)
    names = [k for k, _ in native.named_parameters()]
    z = torch.cat([x.flatten()] + [p.detach().flatten() for p in native.parameters()])
    tangent = torch.randn_like(z)

    def loss(module):
        def f(z):
            params = dict(zip(names, z[x.numel():].split(3)))
            y = torch.func.functional_call(module, params, (z[:x.numel()].view(x.shape),))
            return (y ** 3).sum() + (y.flatten() * z[:y.numel()]).sum()
        return f

    expected = torch.func.hessian(loss(native))(z)
    if training and affine:
        xs, ws = slice(0, x.numel()), slice(x.numel(), x.numel() + 3)
        expected[ws, xs] = expected[xs, ws].T
    assert expected.abs().max() > 1  # not trivially zero
    _close(torch.func.hessian(loss(ours))(z), expected)
    _, jvp_of_grad = torch.func.jvp(torch.func.grad(loss(ours)), (z,), (tangent,))
    _close(jvp_of_grad, expected @ tangent)

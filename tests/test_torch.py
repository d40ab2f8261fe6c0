"""fastbn.torch: the torch.nn batch-norm modules on fastbn kernels, against torch's own.

Tolerances.  In float64 both implementations are exact up to summation order, so
results agree to ~1e-14 (measured); ``TOL[float64] = 1e-10`` leaves four orders of
margin yet is far below any real error (a wrong formula shows at 1e-3 or more).  In
float32 torch accumulates in float32 (channels_last: E[x^2] - E[x]^2), fastbn in
float64, so each batch norm differs by a few ulps; the small CNN's backward passes
through three batch norms, each dividing by the batch std, and four SGD steps compound
it: measured worst differences are 2.5e-5 (gradients) relative to max(1, |value|), about
200 float32 ulps, so ``TOL[float32] = 1e-4``.
"""

import contextlib
import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn  # noqa: E402
import fastbn.torch as fastbn_torch  # noqa: E402
from torch import nn  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def assert_close(actual, expected, tol, what):
    """|actual - expected| <= tol * max(1, max|expected|), elementwise."""
    scale = max(1.0, expected.detach().abs().max().item())
    error = (actual.detach() - expected.detach()).abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol:.1g} * {scale:.3g}"


def assert_same_state(actual_module, expected_module, tol):
    actual, expected = actual_module.state_dict(), expected_module.state_dict()
    assert list(actual) == list(expected)
    for key in expected:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(actual[key], expected[key]), key
        else:
            assert_close(actual[key], expected[key], tol, key)


@contextlib.contextmanager
def torch_kernels_forbidden():
    """Any call to torch's batch-norm kernel fails in this scope: proves fastbn ran."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.nn.functional.batch_norm was called")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "batch_norm", forbidden)
        yield


# --------------------------------------------------------------------------- gradients


def _bn_function(module):
    """(x, weight, bias) -> module(x) with weight and bias as explicit inputs."""
    def apply(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))
    return apply


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("module_class, shape, memory_format", [
    (fastbn_torch.BatchNorm1d, (5, 3), torch.contiguous_format),
    (fastbn_torch.BatchNorm1d, (3, 3, 4), torch.contiguous_format),
    (fastbn_torch.BatchNorm2d, (3, 3, 2, 3), torch.contiguous_format),
    (fastbn_torch.BatchNorm2d, (3, 3, 2, 3), torch.channels_last),
    (fastbn_torch.BatchNorm3d, (2, 3, 2, 2, 2), torch.channels_last_3d),
])
def test_gradcheck(training, module_class, shape, memory_format):
    generator = torch.Generator().manual_seed(0)
    module = module_class(3, dtype=torch.float64)
    module.running_mean.normal_(generator=generator)
    module.running_var.uniform_(0.5, 2.0, generator=generator)
    module.train(training)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1)
    x = x.to(memory_format=memory_format).requires_grad_()
    weight = torch.rand(3, generator=generator, dtype=torch.float64).add_(0.5).requires_grad_()
    bias = torch.randn(3, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_bn_function(module), (x, weight, bias))


def test_gradcheck_without_affine():
    module = fastbn_torch.BatchNorm2d(3, affine=False, dtype=torch.float64)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


# --------------------------------------------------------------------------- small CNN


def make_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10),
    )


def run_step(model, optimizer, x, target):
    optimizer.zero_grad()
    x = x.clone().requires_grad_()
    out = model(x)
    nn.functional.cross_entropy(out, target).backward()
    optimizer.step()
    return out, x.grad


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_cnn_trains_like_torch(dtype, memory_format):
    """A few SGD steps (train), then eval: same outputs, input and parameter gradients,
    parameters and running statistics as the same model with torch's batch norm."""
    tol = TOL[dtype]
    torch_model = make_cnn().to(dtype=dtype, memory_format=memory_format)
    fastbn_model = fastbn_torch.convert(copy.deepcopy(torch_model))
    bn2d_outputs = []
    for module in fastbn_model.modules():
        if isinstance(module, fastbn_torch.BatchNorm2d):
            module.register_forward_hook(lambda module, inputs, y: bn2d_outputs.append(y))
    torch_sgd = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9)
    fastbn_sgd = torch.optim.SGD(fastbn_model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)

    for step in range(4):
        if step == 3:
            torch_model.eval()
            fastbn_model.eval()
        x = (torch.randn(8, 3, 12, 12, generator=generator, dtype=dtype) * 2 + 1).to(memory_format=memory_format)
        target = torch.randint(0, 10, (8,), generator=generator)
        expected_out, expected_dx = run_step(torch_model, torch_sgd, x, target)
        with torch_kernels_forbidden():
            out, dx = run_step(fastbn_model, fastbn_sgd, x, target)
        assert_close(out, expected_out, tol, f"step {step} output")
        assert_close(dx, expected_dx, tol, f"step {step} input gradient")
        named_expected = dict(torch_model.named_parameters())
        for name, parameter in fastbn_model.named_parameters():
            assert_close(parameter.grad, named_expected[name].grad, tol, f"step {step} {name}.grad")
            assert_close(parameter, named_expected[name], tol, f"step {step} {name}")
        assert_same_state(fastbn_model, torch_model, tol)

    assert len(bn2d_outputs) == 8
    assert all(y.is_contiguous(memory_format=memory_format) for y in bn2d_outputs)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("options", [
    {"momentum": None},
    {"momentum": 0.3, "affine": False},
    {"track_running_stats": False},
    {"track_running_stats": False, "affine": False},
])
@pytest.mark.parametrize("torch_class, fastbn_class, shape", [
    (nn.BatchNorm1d, fastbn_torch.BatchNorm1d, (6, 4)),
    (nn.BatchNorm1d, fastbn_torch.BatchNorm1d, (3, 4, 5)),
    (nn.BatchNorm2d, fastbn_torch.BatchNorm2d, (3, 4, 2, 5)),
    (nn.BatchNorm3d, fastbn_torch.BatchNorm3d, (2, 4, 2, 3, 2)),
])
def test_module_options_match_torch(options, torch_class, fastbn_class, shape):
    """Three training batches then two eval ones, float64: identical semantics."""
    torch.manual_seed(0)
    expected_module = torch_class(4, dtype=torch.float64, **options)
    module = fastbn_class(4, dtype=torch.float64, **options)
    if expected_module.affine:
        with torch.no_grad():
            expected_module.weight.uniform_(0.5, 2.0)
            expected_module.bias.normal_()
    module.load_state_dict(expected_module.state_dict())
    for step in range(5):
        if step == 3:
            expected_module.eval()
            module.eval()
        x = torch.randn(shape, dtype=torch.float64) * 3 + 2
        dy = torch.randn(shape, dtype=torch.float64)
        x_expected, x_fastbn = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected_y = expected_module(x_expected)
        expected_y.backward(dy)
        dy_before = dy.clone()
        with torch_kernels_forbidden():
            y = module(x_fastbn)
            y.backward(dy)
        assert torch.equal(x_fastbn.detach(), x) and torch.equal(dy, dy_before)  # inputs untouched
        assert_close(y, expected_y, TOL[torch.float64], f"step {step} y")
        assert_close(x_fastbn.grad, x_expected.grad, TOL[torch.float64], f"step {step} dx")
        for name, parameter in module.named_parameters():
            expected_grad = getattr(expected_module, name).grad
            assert_close(parameter.grad, expected_grad, TOL[torch.float64], f"step {step} d{name}")
        assert_same_state(module, expected_module, TOL[torch.float64])


def test_running_stats_updated_in_place():
    """CPU buffers are shared with NumPy, not replaced: tensors held elsewhere see updates."""
    module = fastbn_torch.BatchNorm2d(3)
    running_mean, address = module.running_mean, module.running_mean.data_ptr()
    module(torch.randn(4, 3, 2, 2) + 5)
    assert module.running_mean is running_mean and running_mean.data_ptr() == address
    assert torch.all(running_mean > 0.2) and int(module.num_batches_tracked) == 1


@pytest.mark.parametrize("make_input, error, match", [
    (lambda: torch.randint(0, 5, (4, 3, 2, 2)), TypeError, "int64"),
    (lambda: torch.randn(4, 3, 2), ValueError, "expected 4D input"),
    (lambda: torch.randn(1, 3, 1, 1), ValueError, "more than 1 value per channel"),
    (lambda: torch.randn(4, 5, 2, 2), RuntimeError, "expected 3 channels"),
])
def test_errors_change_no_state(make_input, error, match):
    module = fastbn_torch.BatchNorm2d(3)
    module(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(error, match=match):
        module(make_input())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------- convert, state


def test_convert_swaps_every_batchnorm_and_shares_tensors():
    inner = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4, affine=False))
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=None), nn.Sequential(
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6, track_running_stats=False), inner))
    model.eval()
    originals = {name: module for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)}
    tensors_before = {name: tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()]}

    converted = fastbn_torch.convert(model)

    assert converted is model
    expected_types = {"1": fastbn_torch.BatchNorm1d, "2.1": fastbn_torch.BatchNorm2d, "2.2.1": fastbn_torch.BatchNorm3d}
    for name, fastbn_type in expected_types.items():
        module = model.get_submodule(name)
        original = originals[name]
        assert type(module) is fastbn_type and module is not original
        assert (module.momentum, module.eps, module.affine, module.track_running_stats, module.training) == \
            (original.momentum, original.eps, original.affine, original.track_running_stats, False)
    tensors_after = {name: tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    assert tensors_after.keys() == tensors_before.keys()
    assert all(tensors_after[name] is tensor for name, tensor in tensors_before.items())
    # Idempotent: converted modules are left as they are.
    assert fastbn_torch.convert(model).get_submodule("1") is model.get_submodule("1")


def test_convert_top_level_batchnorm():
    bn = nn.BatchNorm2d(3)
    converted = fastbn_torch.convert(bn)
    assert type(converted) is fastbn_torch.BatchNorm2d and converted.weight is bn.weight


def test_state_dict_round_trip():
    trained = nn.BatchNorm2d(4, momentum=None)
    with torch.no_grad():
        trained.weight.uniform_()
        trained.bias.normal_()
    for _ in range(3):
        trained(torch.randn(5, 4, 3, 3) * 2 + 1)
    module = fastbn_torch.BatchNorm2d(4, momentum=None)
    module.load_state_dict(trained.state_dict())
    back = nn.BatchNorm2d(4, momentum=None)
    back.load_state_dict(module.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # And into the NumPy layer, as NumPy arrays.
    layer = fastbn.BatchNorm(4, momentum=None)
    layer.load_state_dict({key: value.numpy() for key, value in module.state_dict().items()})
    x = torch.randn(5, 4, 3, 3)
    module.eval()
    np.testing.assert_array_equal(layer.eval()(x.numpy()), module(x).detach().numpy())


# --------------------------------------------------------------------------- public API


def test_public_names_are_all():
    public = sorted(name for name in dir(fastbn_torch) if not name.startswith("_"))
    assert public == sorted(fastbn_torch.__all__)


def test_classes_pickle_under_public_module():
    """Whole-model pickles (torch.save) name fastbn.torch, not its private module."""
    model = fastbn_torch.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    data = pickle.dumps(model)
    assert b"_batchnorm" not in data
    restored = pickle.loads(data)
    assert type(restored[1]) is fastbn_torch.BatchNorm2d
    assert_same_state(restored, model, 0.0)


def test_running_stats_passed_as_keywords(monkeypatch):
    """Works with batch_norm_forward(x, weight, bias, *, running_mean, running_var, ...)."""
    from fastbn.torch import _ops as _batchnorm

    positional = _batchnorm.batch_norm_forward

    def keyword_only(x, weight=None, bias=None, *, running_mean=None, running_var=None, **options):
        return positional(x, weight, bias, running_mean=running_mean, running_var=running_var, **options)

    monkeypatch.setattr(_batchnorm, "batch_norm_forward", keyword_only)
    module = fastbn_torch.BatchNorm2d(3, dtype=torch.float64)
    expected = nn.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) * 2 + 5
    assert_close(module(x), expected(x), TOL[torch.float64], "y")
    assert_same_state(module, expected, TOL[torch.float64])

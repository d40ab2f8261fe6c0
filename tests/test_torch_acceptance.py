"""Acceptance: the properties PyTorch's own batch-norm tests check (test_nn.py BatchNorm
tests, ModuleInfo for BatchNorm1d/2d/3d, OpInfo samples of nn.functional.batch_norm),
written anew and run twice: on torch.nn's classes ("native") and on fastbn.torch's
("fastbn").  Every test runs for both; the native run shows the property holds for
torch, the fastbn run that fastbn keeps it.  (fastbn's half-precision CPU support is a
float32 stopgap in fastbn.torch; see fastbn.torch's docstring.)
"""

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fastbn_torch  # noqa: E402
from fastbn.torch import _ops  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

BACKENDS = ["native", "fastbn"]
CLASSES = {1: (nn.BatchNorm1d, fastbn_torch.BatchNorm1d), 2: (nn.BatchNorm2d, fastbn_torch.BatchNorm2d),
           3: (nn.BatchNorm3d, fastbn_torch.BatchNorm3d)}
SHAPES = {1: [(6, 3), (4, 3, 5)], 2: [(4, 3, 3, 2)], 3: [(2, 3, 2, 2, 3)]}
CASES = [(dim, shape) for dim, shapes in SHAPES.items() for shape in shapes]
F64 = torch.float64


def bn(backend, dim, *args, **kwargs):
    return CLASSES[dim][backend == "fastbn"](*args, **kwargs)


def functional(backend):
    """nn.functional.batch_norm's signature, on torch or on fastbn's operator."""
    if backend == "native":
        return nn.functional.batch_norm

    def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
        return _ops.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)[0]
    return batch_norm


def reference(x, mean, var, weight, bias, eps):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def dims_of(x):
    return [0] + list(range(2, x.dim()))


def close(a, e, tol=1e-10):
    torch.testing.assert_close(a, e, rtol=tol, atol=tol)


# ----------------------------------------------------------------- test_nn-style module tests


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim, shape", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_train_forward_and_running_stats(backend, dim, shape, affine):
    m = bn(backend, dim, 3, affine=affine, dtype=F64)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 2)
            m.bias.uniform_(-1, 1)
    x = torch.randn(shape, dtype=F64) * 3 + 1
    y = m(x)
    var, mean = torch.var_mean(x, dims_of(x), correction=0)
    close(y, reference(x, mean, var, m.weight, m.bias, m.eps))
    n = x.numel() // 3
    close(m.running_mean, 0.1 * mean)
    close(m.running_var, 0.9 + 0.1 * var * n / (n - 1))
    assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim, shape", CASES)
def test_eval_uses_running_stats(backend, dim, shape):
    m = bn(backend, dim, 3, dtype=F64).eval()
    m.running_mean.uniform_(-1, 1)
    m.running_var.uniform_(0.5, 2)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(shape, dtype=F64)
    close(m(x), reference(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps))
    close(m.state_dict(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cumulative_moving_average(backend):
    m = bn(backend, 2, 3, momentum=None, dtype=F64)
    xs = [torch.randn(4, 3, 2, 2, dtype=F64) + i for i in range(3)]
    for x in xs:
        m(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    variances = torch.stack([x.var((0, 2, 3)) for x in xs])
    close(m.running_mean, means.mean(0))
    close(m.running_var, variances.mean(0))
    assert m.num_batches_tracked.item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_running_stats_uses_batch_stats_in_eval(backend):
    m = bn(backend, 2, 3, track_running_stats=False, dtype=F64).eval()
    assert m.running_mean is None and m.num_batches_tracked is None
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    close(m(x), reference(x, mean, var, m.weight, m.bias, m.eps))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_channel(backend):
    m = bn(backend, 1, 3, dtype=F64)
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, dtype=F64))
    m.eval()
    assert m(torch.randn(1, 3, dtype=F64)).shape == (1, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim, bad_shape", [(1, (2, 3, 4, 5)), (2, (2, 3, 4)), (3, (2, 3, 4, 5))])
def test_wrong_rank_is_valueerror(backend, dim, bad_shape):
    with pytest.raises(ValueError):
        bn(backend, dim, 3)(torch.randn(bad_shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_is_runtimeerror(backend, training):
    with pytest.raises(RuntimeError):
        bn(backend, 2, 3).train(training)(torch.randn(2, 4, 2, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dim, shape", [(1, (0, 3)), (2, (0, 3, 2, 2)), (3, (0, 3, 1, 1, 2))])
def test_empty_batch(backend, training, dim, shape):
    m = bn(backend, dim, 3, dtype=F64).train(training)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    y = m(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape and torch.equal(m.weight.grad, torch.zeros(3, dtype=F64))
    close(m.running_mean, before["running_mean"])
    close(m.running_var, before["running_var"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    m = bn(backend, 2, 3, dtype=F64)
    base = torch.randn(4, 2, 3, 6, dtype=F64)
    x = base.transpose(1, 2)[..., ::2]  # (4, 3, 2, 3), neither layout
    assert not x.is_contiguous()
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    close(m(x), reference(x, mean, var, m.weight, m.bias, m.eps))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim, memory_format", [(2, torch.channels_last), (3, torch.channels_last_3d)])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_kept(backend, dim, memory_format, training):
    m = bn(backend, dim, 3, dtype=F64).train(training)
    x = torch.randn((2, 3, 2, 3) + (2,) * (dim - 2), dtype=F64).contiguous(memory_format=memory_format)
    x.requires_grad_()
    y = m(x)
    assert y.is_contiguous(memory_format=memory_format)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=memory_format)
    close(y, m(x.contiguous()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_without_num_batches_tracked(backend):
    m = bn(backend, 2, 3)
    state = m.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # saved before num_batches_tracked existed
    m.load_state_dict(state)
    assert m.num_batches_tracked.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend):
    m = bn(backend, 2, 3, dtype=F64)
    m.weight.requires_grad_(False)
    x = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    m(x).sum().backward()
    assert m.weight.grad is None and m.bias.grad is not None and x.grad is not None


# ----------------------------------------------------------------- ModuleInfo-style tests


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim, shape", CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_grad_and_gradgrad(backend, dim, shape, training, affine):
    m = bn(backend, dim, 3, affine=affine, track_running_stats=not training, dtype=F64).train(training)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    params = tuple(m.parameters())

    def f(x, *p):
        return torch.func.functional_call(m, dict(zip([k for k, _ in m.named_parameters()], p)), (x,))
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_forward_ad(backend, training):
    m = bn(backend, 2, 3, track_running_stats=not training, dtype=F64).train(training)
    x = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickle_and_deepcopy(backend):
    m = bn(backend, 2, 3)
    m(torch.randn(4, 3, 2, 2))
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert type(clone) is type(m)
        close(clone.state_dict(), m.state_dict())
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    fresh = bn(backend, 2, 3)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 3, 2, 2)
    close(fresh.eval()(x), m.eval()(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_factory_kwargs(backend, dtype):
    m = bn(backend, 2, 3, dtype=dtype, device="cpu")
    for t in (m.weight, m.bias, m.running_mean, m.running_var):
        assert t.dtype == dtype and t.device.type == "cpu"
    assert m.num_batches_tracked.dtype == torch.long
    assert m(torch.randn(4, 3, 2, 2, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_and_inference_mode(backend):
    m = bn(backend, 2, 3)
    x = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        y = m(x)
    assert not y.requires_grad
    with torch.inference_mode():
        assert m.eval()(x).shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_train_eval_consistent(backend):
    m = bn(backend, 2, 3, dtype=F64)
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    for _ in range(3):
        m.train()(x)
    m.eval()
    close(m(x), m(x.clone()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpu(backend, dtype):
    m = bn(backend, 2, 3)  # float32 parameters, mixed precision as torch allows
    x = torch.randn(4, 3, 2, 2).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    close(y.float(), nn.BatchNorm2d(3)(x.float()), tol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph(backend, training):
    torch._dynamo.reset()
    m = nn.Sequential(nn.Conv2d(3, 3, 1), bn(backend, 2, 3)).train(training)
    x = torch.randn(4, 3, 2, 2)
    explanation = torch._dynamo.explain(copy.deepcopy(m))(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(copy.deepcopy(m), fullgraph=True, backend="aot_eager")
    close(compiled(x), copy.deepcopy(m)(x), tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_export(backend, training):
    m = bn(backend, 2, 3).train(training)
    x = torch.randn(4, 3, 2, 2)
    exported = torch.export.export(copy.deepcopy(m), (x,))
    close(exported.module()(x), copy.deepcopy(m)(x), tol=1e-5)


# ----------------------------------------------------------------- OpInfo-style functional samples


SAMPLES = [  # (shape, weight, bias, running stats, training, momentum, eps)
    ((3, 5), True, True, True, True, 0.1, 1e-5),
    ((3, 5), False, False, True, False, 0.1, 1e-5),
    ((3, 5, 2), True, False, False, True, 0.5, 1e-3),
    ((3, 5, 2, 2), False, True, True, True, 0.9, 0.3),
    ((3, 5, 2, 2, 2), True, True, True, False, 0.1, 1e-5),
    ((2, 5, 1, 1), True, True, False, True, 0.1, 1e-5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_functional_samples(backend, sample, request):
    if backend == "native" and sample == SAMPLES[3]:
        # torch 2.13's batch-norm double backward, bias without weight in training:
        # a Jacobian mismatch in gradgradcheck (fastbn's passes).
        request.applymarker(pytest.mark.xfail(strict=True, reason="torch's own double backward"))
    shape, has_weight, has_bias, has_running, training, momentum, eps = sample
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    weight = torch.rand(5, dtype=F64, requires_grad=True) + 0.5 if has_weight else None
    bias = torch.randn(5, dtype=F64, requires_grad=True) if has_bias else None
    if has_running:
        rm, rv = torch.randn(5, dtype=F64), torch.rand(5, dtype=F64) + 0.5
    else:
        rm = rv = None
    expected_rm = None if rm is None else rm.clone()
    expected_rv = None if rv is None else rv.clone()
    y = functional(backend)(x, rm, rv, weight, bias, training, momentum, eps)
    if training:
        var, mean = torch.var_mean(x.detach(), dims_of(x), correction=0)
    else:
        var, mean = rv, rm
    close(y, reference(x.detach(), mean, var, weight, bias, eps))
    if training and has_running:
        n = x.numel() // 5
        close(rm, (1 - momentum) * expected_rm + momentum * mean)
        close(rv, (1 - momentum) * expected_rv + momentum * var * n / (n - 1))
    inputs = [t for t in (x, weight, bias) if t is not None]

    def f(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if has_weight else None
        bb = next(it) if has_bias else None
        return functional(backend)(xx, None if training else rm, None if training else rv, ww, bb,
                                   training, momentum, eps)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_vmap_eval(backend):
    rm, rv = torch.randn(5, dtype=F64), torch.rand(5, dtype=F64) + 0.5
    x = torch.randn(4, 3, 5, 2, dtype=F64)
    f = functional(backend)
    y = torch.vmap(lambda xi: f(xi, rm, rv, None, None, False))(x)
    close(y, reference(x.flatten(0, 1), rm, rv, None, None, 1e-5).view_as(x))

"""torch.func (grad, vmap, jvp, jacrev, jacfwd) and forward-mode AD through fastbn.torch,
against torch's BatchNorm (float64: agreement to ~1e-15 measured, 1e-10 asserted)."""

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fastbn_torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap  # noqa: E402

F64 = torch.float64

# torch.func.jvp's first call scripts a helper with torch.jit (torch's own warning).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _close(a, e, tol=1e-10):
    torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def _nets(training, track_running_stats=True):
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                             nn.BatchNorm2d(4, track_running_stats=track_running_stats), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
                             nn.BatchNorm1d(5, track_running_stats=track_running_stats)).double()
    native = net()
    if track_running_stats:
        for m in (native[1], native[5]):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    ours = fastbn_torch.convert(net())
    ours.load_state_dict(native.state_dict())
    return ours.train(training), native.train(training)


def test_per_sample_gradients_eval():
    ours, native = _nets(False)
    x, target = torch.randn(6, 3, 3, 3, dtype=F64), torch.randint(0, 5, (6,))

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, xi, ti):
            out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return nn.functional.cross_entropy(out, ti.unsqueeze(0))
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    actual, expected = per_sample(ours), per_sample(native)
    assert actual.keys() == expected.keys()
    for key in expected:
        _close(actual[key], expected[key])


@pytest.mark.parametrize("training", [True, False])
def test_jvp_and_forward_ad(training):
    # Training with running statistics mutates buffers, which torch.func forbids for
    # torch's BatchNorm too: batch statistics only, as torch.
    ours, native = _nets(training, track_running_stats=not training)
    x, tangent = torch.randn(4, 3, 3, 3, dtype=F64), torch.randn(4, 3, 3, 3, dtype=F64)
    y, t = jvp(ours, (x,), (tangent,))
    y_expected, t_expected = jvp(native, (x,), (tangent,))
    _close(y, y_expected)
    _close(t, t_expected)
    with fwAD.dual_level():
        out = ours(fwAD.make_dual(x, tangent))
        _close(fwAD.unpack_dual(out).tangent, t_expected)


def test_jvp_with_respect_to_parameters():
    ours, native = _nets(True, track_running_stats=False)
    x = torch.randn(4, 3, 3, 3, dtype=F64)
    params = {k: v.detach() for k, v in native.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    _, t = jvp(lambda p: functional_call(ours, p, (x,)), (params,), (tangents,))
    _, t_expected = jvp(lambda p: functional_call(native, p, (x,)), (params,), (tangents,))
    _close(t, t_expected)


def test_vmap_training_batch_statistics_per_slice():
    ours = fastbn_torch.BatchNorm2d(3, track_running_stats=False, dtype=F64)
    native = nn.BatchNorm2d(3, track_running_stats=False, dtype=F64)
    x = torch.randn(4, 5, 3, 2, 2, dtype=F64)
    _close(vmap(ours)(x), vmap(native)(x))
    _close(jacrev(ours)(x[0]), jacrev(native)(x[0]))
    _close(jacfwd(ours)(x[0]), jacfwd(native)(x[0]))


def test_vmap_training_with_unbatched_running_stats_raises_like_torch():
    x = torch.randn(2, 4, 3, dtype=F64)
    with pytest.raises(RuntimeError):
        vmap(nn.BatchNorm1d(3, dtype=F64))(x)
    with pytest.raises(RuntimeError):
        vmap(fastbn_torch.BatchNorm1d(3, dtype=F64))(x)


def test_vmap_eval():
    ours, native = _nets(False)
    x = torch.randn(3, 2, 3, 3, 3, dtype=F64)
    _close(vmap(ours)(x), vmap(native)(x))

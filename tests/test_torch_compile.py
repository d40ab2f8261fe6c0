"""fastbn.torch under torch.compile and torch.export: real operators, no graph breaks."""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fastbn_torch  # noqa: E402
from torch import nn  # noqa: E402


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6))


def test_import_fastbn_does_not_import_torch():
    code = "import sys, fastbn; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_no_graph_breaks_and_same_results(training):
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model, reference = fastbn_torch.convert(make_net()).train(training), fastbn_torch.convert(make_net()).train(training)
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    x = torch.randn(5, 3, 4, 4)
    explained = torch._dynamo.explain(fastbn_torch.convert(make_net()).train(training))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = compiled(xc), reference(xr)
    assert len(graphs) == 1
    assert any("fastbn.batch_norm" in str(n.target) for n in graphs[0].graph.nodes)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_compile_aot_autograd_matches_eager(training):
    torch._dynamo.reset()
    model, reference = fastbn_torch.convert(make_net()).train(training), fastbn_torch.convert(make_net()).train(training)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(5, 3, 4, 4)
        xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, expected = compiled(xc), reference(xr)
        torch.testing.assert_close(y, expected)
        y.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(xc.grad, xr.grad)
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


@pytest.mark.parametrize("training", [True, False])
def test_export(training):
    model = fastbn_torch.convert(make_net()).train(training)
    x = torch.randn(5, 3, 4, 4)
    exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes]
    assert sum("fastbn.batch_norm" in t for t in targets) == 2
    fresh = fastbn_torch.convert(make_net()).train(training)
    torch.testing.assert_close(exported.module()(x), fresh(x))


@pytest.mark.parametrize("memory_format, shape", [(torch.channels_last, (2, 3, 2, 2)),
                                                  (torch.channels_last_3d, (2, 3, 2, 2, 2))])
def test_fake_kernels_match_real_strides(memory_format, shape):
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    w, b = torch.ones(3), torch.zeros(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    torch.library.opcheck(torch.ops.fastbn.batch_norm.default, (x, w, b, rm, rv, True, 0.1, 1e-5))
    dy = torch.randn(shape).contiguous(memory_format=memory_format)
    mean, invstd = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default, (dy, x, mean, invstd, w, True))
    y = torch.ops.fastbn.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)[0]
    assert y.is_contiguous(memory_format=memory_format)


def test_cumulative_momentum_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = fastbn_torch.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    assert torch._dynamo.explain(model)(torch.randn(4, 3, 2, 2, dtype=torch.float64)).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(fastbn_torch.BatchNorm2d(3, momentum=None, dtype=torch.float64),
                             fullgraph=True, backend="aot_eager")
    native = nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    for i in range(3):
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64) + i
        compiled(x)
        native(x)
    torch.testing.assert_close(compiled._orig_mod.state_dict(), native.state_dict())

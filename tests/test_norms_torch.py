"""fastbn.torch.LayerNorm, GroupNorm and InstanceNorm1d/2d/3d against torch.nn's in
float64: outputs, gradients (incl. gradcheck), instance norm's running statistics,
channels_last, and convert()."""

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fbt  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-12)


def _run(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    grads = [p.grad.clone() for p in module.parameters()]
    return y.detach(), x.grad, grads


def _compare(make, fast_class, shape, channels_last=False, seed=0):
    torch.manual_seed(seed)
    reference = make().double()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
    fast = fbt.convert(make().double())
    assert type(fast) is fast_class
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    dy = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for _ in range(2):  # twice: running statistics after two updates
        want, got = _run(reference, x, dy), _run(fast, x, dy)
        if channels_last:
            assert got[0].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], **TOL)
        for a, b in zip(got[2], want[2]):
            torch.testing.assert_close(a, b, **TOL)
        for a, b in zip(fast.buffers(), reference.buffers()):
            torch.testing.assert_close(a, b, **TOL)
    return reference, fast


@pytest.mark.parametrize("shape, normalized", [((6, 10), (10,)), ((2, 5, 4, 3), (4, 3)), ((7,), (7,))])
def test_layer_norm_module(shape, normalized):
    _compare(lambda: torch.nn.LayerNorm(normalized), fbt.LayerNorm, shape)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_module(channels_last):
    _compare(lambda: torch.nn.GroupNorm(2, 6), fbt.GroupNorm, (3, 6, 4, 5), channels_last)


@pytest.mark.parametrize("cls, fast_class, shape", [
    (torch.nn.InstanceNorm1d, fbt.InstanceNorm1d, (3, 4, 7)),
    (torch.nn.InstanceNorm2d, fbt.InstanceNorm2d, (2, 4, 5, 3)),
    (torch.nn.InstanceNorm3d, fbt.InstanceNorm3d, (2, 4, 3, 2, 3)),
])
def test_instance_norm_module_running_stats_and_eval(cls, fast_class, shape):
    reference, fast = _compare(lambda: cls(4, affine=True, track_running_stats=True, momentum=0.3),
                               fast_class, shape)
    reference.eval()
    fast.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(fast(x), reference(x), **TOL)
    torch.testing.assert_close(fast(x[0]), reference(x[0]), **TOL)  # unbatched input


def test_instance_norm_without_running_stats_channels_last():
    _compare(lambda: torch.nn.InstanceNorm2d(3), fbt.InstanceNorm2d, (2, 3, 4, 4), channels_last=True)


def test_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.fastbn.group_norm(x, 2, w, b, None, None, 0.0,
                                                                                1e-5)[0], (x, w, b))
    wl = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    bl = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.fastbn.layer_norm(x, [3, 2], w, b, 1e-5)[0],
                                    (x, wl, bl))


def test_double_backward_is_a_clear_error():
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    y = fbt.GroupNorm(2, 4).double()(x)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        dx.sum().backward()


def test_convert_shares_parameters_and_keeps_others():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.LayerNorm(5), torch.nn.InstanceNorm2d(4)))
    weight = model[1].weight
    converted = fbt.convert(model)
    assert type(converted[0]) is torch.nn.Conv2d
    assert type(converted[1]) is fbt.GroupNorm and converted[1].weight is weight
    assert type(converted[2]) is fbt.BatchNorm2d
    assert type(converted[3][0]) is fbt.LayerNorm and type(converted[3][1]) is fbt.InstanceNorm2d
    assert "backend=fastbn" in repr(converted[1])


def test_bad_input_is_torch_error_class():
    with pytest.raises(RuntimeError, match="num_groups"):
        torch.ops.fastbn.group_norm(torch.zeros(2, 4, 3), 3, None, None, None, None, 0.0, 1e-5)
    with pytest.raises(RuntimeError, match="x: expected dtype"):
        fbt.LayerNorm(3)(torch.zeros(2, 3, dtype=torch.int64))


def test_compile_fullgraph_without_graph_breaks():
    """torch.compile sees the norm operators through their fake kernels: one graph, no
    breaks, values, gradients and running statistics as in eager mode."""
    torch.manual_seed(0)
    nn = torch.nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True,
                             track_running_stats=True), nn.LayerNorm(5)).double()

    eager, compiled_model = fbt.convert(make()), fbt.convert(make())
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fbt.convert(make()))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = compiled(xc), eager(xe)
    torch.testing.assert_close(y, expected, **TOL)
    y.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, **TOL)
    for got, want in zip(compiled_model.parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, want.grad, **TOL)
    torch.testing.assert_close(compiled_model.state_dict(), eager.state_dict(), **TOL)

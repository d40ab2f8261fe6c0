"""fastbn.torch.fuse: BatchNorm -> [add ->] ReLU chains become BatchNormAct modules; the
fused model computes what the original does (float32 tolerance of tests/test_torch.py:
1e-4 relative to max(1, |value|), a few ulps of each batch norm's statistics)."""

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fastbn.torch as fastbn_torch  # noqa: E402


class Block(nn.Module):
    """conv-BN-ReLU(inplace) -> conv-BN -> += shortcut -> F.relu, and a branch."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.bn3 = nn.BatchNorm2d(c)  # a branch: its output has two users, not fused

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = F.relu(out)
        side = self.bn3(out)
        return torch.relu(side) + side


class Reused(nn.Module):
    """One BatchNorm called twice (not fused), a method relu and torch.add."""

    def __init__(self, c=4):
        super().__init__()
        self.bn = nn.BatchNorm1d(c)
        self.bn2 = nn.BatchNorm1d(c)

    def forward(self, x):
        a = self.bn(x).relu()
        b = self.bn(a)
        return torch.add(self.bn2(b), x).relu_()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x) if x.sum() > 0 else x


def _check_same(model, x):
    torch.manual_seed(0)
    fused = fastbn_torch.fuse(fastbn_torch.convert(_copy(model)))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = fused(x1), model(x2)
    scale = max(1.0, y_ref.abs().max().item())
    assert (y - y_ref).abs().max().item() <= 1e-4 * scale
    y.sum().backward()
    y_ref.sum().backward()
    assert (x1.grad - x2.grad).abs().max().item() <= 1e-4 * max(1.0, x2.grad.abs().max().item())
    return fused


def _copy(model):
    import copy
    return copy.deepcopy(model)


def test_resnet_block_fuses_both_chains_and_keeps_the_branch():
    model = nn.Sequential(Block(), Block())
    fused = _check_same(model, torch.randn(2, 4, 5, 5))
    for i in ("0", "1"):
        assert type(fused.get_submodule(f"{i}.bn1")) is fastbn_torch.BatchNormAct2d
        assert type(fused.get_submodule(f"{i}.bn2")) is fastbn_torch.BatchNormAct2d
        assert type(fused.get_submodule(f"{i}.bn3")) is fastbn_torch.BatchNorm2d
    assert list(fused.state_dict()) == list(model.state_dict())
    calls = [n for n in fused.graph.nodes if n.op == "call_module" and n.target == "0.bn2"]
    assert len(calls) == 1 and len(calls[0].args) == 2  # (conv2 output, the shortcut)


def test_reused_module_is_left_alone_and_torch_add_fuses():
    model = Reused()
    fused = _check_same(model, torch.randn(6, 4))
    assert type(fused.get_submodule("bn")) is fastbn_torch.BatchNorm1d
    assert type(fused.get_submodule("bn2")) is fastbn_torch.BatchNormAct1d


def test_fuse_shares_parameters_and_leaves_the_model():
    model = Block()
    fused = fastbn_torch.fuse(model)
    assert fused.bn1.weight is model.bn1.weight and fused.bn1.running_mean is model.bn1.running_mean
    assert type(model.bn1) is nn.BatchNorm2d


def test_untraceable_model_names_the_reason():
    with pytest.raises(TypeError, match="^model: fastbn.torch.fuse needs a model torch.fx can trace.*TraceError"):
        fastbn_torch.fuse(Untraceable())

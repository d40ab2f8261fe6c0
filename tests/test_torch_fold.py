"""fastbn.torch.fold: eval BatchNorm folded into the preceding Conv/Linear in float64.

The folded float32 model equals the unfolded eval model to float32 rounding: the
folded weight is rounded once from float64 (relative 2^-24) and the convolution sums
K products, so the difference is bounded by ~K * eps32 * sum|w||x|; with the small
layers here that is below 1e-5 relative to max(1, |y|), the tolerance used (measured:
~5e-7).
"""

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import fastbn.torch as fastbn_torch  # noqa: E402


def _randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("layer, bn, shape", [
    (nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8), (2, 4, 7, 7)),
    (nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4), (2, 4, 7, 7)),
    (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (2, 3, 9)),
    (nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), (2, 2, 4, 4, 4)),
    (nn.Linear(7, 5), nn.BatchNorm1d(5), (3, 7)),
    (nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5), (3, 7)),
])
def test_folded_model_matches_the_eval_model(layer, bn, shape):
    model = _randomize(nn.Sequential(layer, bn, nn.ReLU()))
    x = torch.randn(shape)
    folded = fastbn_torch.fold(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        y, y_ref = folded(x), model(x)
    assert (y - y_ref).abs().max().item() <= 1e-5 * max(1.0, y_ref.abs().max().item())
    assert model[1] is bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_batch_norm_with_another_user_or_input_is_kept():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.bn_alone = nn.BatchNorm2d(3)

        def forward(self, x):
            c = self.conv(x)
            return self.bn(c) + c + self.bn_alone(x)

    model = _randomize(TwoUsers())
    folded = fastbn_torch.fold(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn_alone, nn.BatchNorm2d)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="^model: fastbn.torch.fold expected a model in eval mode"):
        fastbn_torch.fold(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))

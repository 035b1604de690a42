"""``frozen_bn``: BatchNorm layers keep their running statistics while the teacher and the search train.

The ImageNet MobileNetV2 of $GMPQ_DATA has BN folded into its convolutions (identity BN layers). In plain train mode
BN renormalises each layer by batch statistics and the features die; with ``train_mode(model, frozen_bn=True)``
a training forward equals the evaluation forward exactly."""

import pytest
import torch
from torch import nn

from gmpq.models import create_search_model, load_weights
from gmpq.runtime.modes import train_mode
from gmpq.search.config import SearchConfig


def _folded_block() -> nn.Sequential:
    """conv -> identity BN (weight 1, mean 0, var 1 - eps, a folded bias) -> ReLU6, like the ImageNet MobileNetV2."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var.fill_(1 - bn.eps)
        bn.bias.copy_(torch.tensor([-1.0, 0.5, 2.0, -0.2]))
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU6())


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_bn_train_forward_equals_eval_forward(frozen):
    """Frozen: the train-mode forward equals the eval one and the statistics do not move; plain train mode uses
    batch statistics (different outputs, moved statistics)."""
    model = _folded_block()
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        ref = model.eval()(x)
        out = train_mode(model, frozen_bn=frozen)(x)
    assert model.training and model[1].training != frozen
    assert torch.equal(out, ref) == frozen
    assert torch.equal(model[1].running_mean, torch.zeros(4)) == frozen


def test_frozen_bn_is_off_by_default():
    assert SearchConfig().frozen_bn is False


def test_folded_imagenet_mobilenetv2_needs_frozen_bn(shared_data, one_thread):
    """The real weights at 32 x 32 (search-time variant): in plain train mode the features die, with frozen BN they
    are the evaluation features (compared before the classifier: its dropout acts in train mode)."""
    model = create_search_model("mobilenetv2", 10)
    load_weights(model, shared_data / "imagenet" / "mobilenet_v2_imagenet.pth", strict=False)  # 10-class head
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval().features(x)
        frozen = train_mode(model, frozen_bn=True).features(x)
        plain = train_mode(model, frozen_bn=False).features(x)
    assert ref.abs().mean() > 0.1
    assert torch.equal(frozen, ref)
    assert plain.abs().mean() < 1e-2 * ref.abs().mean()

"""Quantized modules, swapping by name, calibration, and policy application on real architectures."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from gmpq.errors import UserError
from gmpq.quant import (
    ActQuantizer,
    LayerSpec,
    QConv2d,
    QLinear,
    apply_policy,
    calibrate,
    quantizable_layers,
    require_calibrated,
    swap_layers,
    uniform_policy,
)
from gmpq.quant import functional as F


def tiny_depthwise() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.ReLU(),  # grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def test_swap_keeps_parameter_names_and_storage():
    model = tiny_depthwise()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    swap_layers(model, {"0": LayerSpec(4, 4), "3": LayerSpec(3, 4), "6": LayerSpec(2, 8), "10": LayerSpec(8, 8)})
    assert isinstance(model[3], QConv2d) and model[3].groups == 8 and isinstance(model[10], QLinear)
    after = model.state_dict()
    for k, ptr in before.items():
        assert after[k].data_ptr() == ptr, k
    # a float checkpoint still loads: only quantizer state is new
    missing, unexpected = model.load_state_dict(tiny_depthwise().state_dict(), strict=False)
    assert not unexpected and all(".w_quant." in m or ".a_quant." in m for m in missing)


def test_quantized_conv_equals_float_conv_on_quantized_operands():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    ref = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    ref.load_state_dict(conv.state_dict())
    q = QConv2d.from_float(conv, LayerSpec(3, 4, per_channel=True))
    x = torch.rand(2, 8, 6, 6)
    calibrate(q, [x])
    alpha = q.a_quant.alpha.detach()
    xq = F.pact_fake_quant(x, alpha, 4)
    wq = F.symmetric_fake_quant(ref.weight, 3, per_channel=True)
    expected = nn.functional.conv2d(xq, wq, ref.bias, padding=1, groups=8)
    assert torch.equal(q(x), expected)


def test_uncalibrated_activation_quantizer_refuses():
    model = tiny_depthwise()
    apply_policy(model, uniform_policy(model, "toy", 4, 4))
    with pytest.raises(UserError, match="not calibrated"):
        model(torch.rand(1, 3, 8, 8))
    with pytest.raises(UserError, match="not calibrated"):
        require_calibrated(model)


def test_calibration_sets_finite_ranges_and_sign():
    model = tiny_depthwise()
    apply_policy(model, uniform_policy(model, "toy", 4, 4))
    x = torch.randn(8, 3, 8, 8)  # signed input to the first conv, non-negative after ReLUs
    calibrate(model, [(x, None), (x * 2, None)])
    acts = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    assert all(torch.isfinite(m.alpha) and m.alpha > 0 for m in acts.values())
    assert bool(acts["0.a_quant"].signed) and not bool(acts["3.a_quant"].signed)
    out = model(x)
    assert torch.isfinite(out).all()


def test_lsq_plus_calibration():
    layer = QLinear.from_float(nn.Linear(4, 3), LayerSpec(4, 4, "lsq", "lsq+"))
    x = torch.rand(32, 4) * 3 - 1
    calibrate(layer, [x])
    assert layer.a_quant.offset.item() < 0 and layer.a_quant.step.item() > 0
    out = layer(x)
    out.sum().backward()
    assert layer.w_quant.step.grad is not None and layer.a_quant.offset.grad is not None


def test_swap_errors_list_everything_at_once():
    model = tiny_depthwise()
    with pytest.raises(UserError) as e:
        swap_layers(model, {"nope": LayerSpec(4), "1": LayerSpec(4), "also.missing": LayerSpec(4)})
    msg = str(e.value)
    assert "'also.missing'" in msg and "'nope'" in msg and "1 (BatchNorm2d)" in msg


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_apply_policy_timm_resnet18(bits):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    policy = uniform_policy(model, "resnet18", bits, bits, keep_full_precision=("conv1", "fc"))
    apply_policy(model, policy)
    q = [n for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]
    assert len(q) == len(quantizable_layers(model)) - 2
    x = torch.randn(2, 3, 64, 64)
    calibrate(model, [x])
    assert model(x).shape == (2, 10)


def test_apply_policy_torchvision_mobilenetv2_depthwise():
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    policy = uniform_policy(model, "mobilenet_v2", 4, 8)
    apply_policy(model, policy)
    dw = [m for m in model.modules() if isinstance(m, QConv2d) and m.groups == m.in_channels and m.groups > 1]
    assert len(dw) == 17
    x = torch.randn(2, 3, 64, 64)
    calibrate(model, [x])
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_timm_mobilenetv2_quantizes():
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10)
    apply_policy(model, uniform_policy(model, "mobilenetv2_100", 3, 4))
    x = torch.randn(1, 3, 64, 64)
    calibrate(model, [x])
    assert model(x).shape == (1, 10)


def test_requantize_already_quantized_layer():
    model = tiny_depthwise()
    swap_layers(model, {"0": LayerSpec(4, 4)})
    swap_layers(model, {"0": LayerSpec(2, 8)})
    assert model[0].w_quant.bits == 2 and model[0].a_quant.bits == 8

"""ONNX QDQ export: onnxruntime runs it and matches the PyTorch fake-quant outputs."""

import pytest
import torch
from torch import nn

from gmpq.quant import apply_policy, calibrate, make_policy, uniform_policy
from gmpq.quant.onnx_export import export_onnx, qdq_node_counts, run_onnx


def net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, groups=16, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("methods", [("symmetric", "pact"), ("lsq", "lsq+")])
def test_onnx_matches_pytorch(tmp_path, bits, methods):
    torch.manual_seed(bits)
    model = net()
    apply_policy(model, uniform_policy(model, "net", bits, bits), *methods)
    x = torch.randn(6, 3, 16, 16)
    calibrate(model, [x])
    model.eval()
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    counts = qdq_node_counts(path)
    assert counts["QuantizeLinear"] == 8 and counts["DequantizeLinear"] == 8  # 4 layers x (weight + input)
    with torch.no_grad():
        expected = model(x)
    got = run_onnx(path, x)  # dynamic batch: exported with 1 image, run with 6
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_onnx_mixed_policy_with_full_precision_layers(tmp_path):
    model = net()
    layers = {"0": {"w_bits": 32, "a_bits": None}, "3": {"w_bits": 2, "a_bits": 4},
              "5": {"w_bits": 5, "a_bits": 3}, "9": {"w_bits": 8, "a_bits": None}}
    apply_policy(model, make_policy("net", layers, "hand"))
    x = torch.randn(4, 3, 16, 16)
    calibrate(model, [x])
    model.eval()
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert qdq_node_counts(path)["QuantizeLinear"] == 5
    with torch.no_grad():
        assert torch.allclose(run_onnx(path, x), model(x), atol=1e-6, rtol=0)

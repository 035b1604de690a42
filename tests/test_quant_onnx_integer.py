"""Integer ONNX export: onnxruntime's optimizer turns it into integer kernels, the containers hold the b-bit codes
with their restricted range, and the optimized session scores like the fake-quant model."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from gmpq.deploy.latency import op_counts, session
from gmpq.quant import apply_policy, calibrate, make_policy, uniform_policy
from gmpq.quant.onnx_integer import export_integer_onnx, wide_weights


def net() -> nn.Sequential:
    """Conv-BN-ReLU chain, a depthwise conv, ReLU6 and a residual-free head: every output pattern once."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, groups=16, padding=1), nn.ReLU6(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def quantized(policy_bits: dict, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = net()
    with torch.no_grad():  # non-trivial BN statistics (one negative gamma: the codes' sign flips when folded)
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.weight[3] = -0.7
    layers = {n: {"w_bits": w, "a_bits": a} for n, (w, a) in policy_bits.items()}
    apply_policy(model, make_policy("net", layers, "hand"))
    x = torch.randn(32, 3, 16, 16)
    calibrate(model, [x], seed=0)
    return model.eval(), x


def initializer(model_proto, suffix: str) -> np.ndarray:
    (t,) = [t for t in model_proto.graph.initializer if t.name.startswith(suffix)]
    return numpy_helper.to_array(t)


def test_optimized_session_runs_integer_kernels(tmp_path):
    model, x = quantized({"0": (4, 8), "3": (3, 4), "5": (8, 8), "9": (32, None)})
    path = tmp_path / "m.int.onnx"
    stats = export_integer_onnx(model, x[:1], path, [x], outputs="uint8")
    assert stats.integer_layers == ["0", "3", "5"] and stats.float_layers == []
    # 0 -> BN -> ReLU -> Q(3): moved onto the conv output; 3 -> ReLU6 -> Q(5): too (alpha <= 6); 5 -> ReLU -> pool
    assert stats.fused_outputs == 2 and stats.requantized_outputs == ["5"]
    session(path, optimized_path=tmp_path / "opt.onnx")
    ops = op_counts(tmp_path / "opt.onnx")
    assert ops.get("QLinearConv") == 3 and "Conv" not in ops and "BatchNormalization" not in ops


def test_containers_hold_the_restricted_ranges(tmp_path):
    model, x = quantized({"0": (3, 8), "3": (2, 3), "5": (8, 4), "9": (32, None)})
    path = tmp_path / "m.int.onnx"
    export_integer_onnx(model, x[:1], path, [x])
    m = onnx.load(str(path))
    w0, w3, w5 = (initializer(m, f"{n}.w.codes") for n in "035")
    assert w0.dtype == np.int8 and np.abs(w0).max() == 3 and initializer(m, "0.w.zero_point").max() == 0
    assert w3.dtype == np.int8 and np.abs(w3).max() == 1  # 2 bits symmetric: codes -1, 0, 1
    assert w5.dtype == np.uint8 and initializer(m, "5.w.zero_point").min() == 128  # 8-bit: uint8, offset 128
    # the folded BN keeps the 3-bit codes; channel 3 (gamma < 0) has them negated
    codes, _ = model[0].w_quant.codes_and_scale(model[0].weight)
    assert np.array_equal(w0[3], -codes[3].numpy().astype(np.int8))
    assert np.array_equal(w0[2], codes[2].numpy().astype(np.int8))
    clips = {(int(numpy_helper.to_array(i_lo)), int(numpy_helper.to_array(i_hi)))
             for n in m.graph.node if n.op_type == "Clip"
             for i_lo in m.graph.initializer if i_lo.name == n.input[1]
             for i_hi in m.graph.initializer if i_hi.name == n.input[2]}
    # input of 0 is signed (zero point 128, 8 bits: codes 1..255); 3: unsigned 3 bits; 5: unsigned 4 bits
    assert clips == {(1, 255), (0, 7), (0, 15)}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_wide_weights_threshold(bits):
    qp = 2 ** (bits - 1) - 1
    assert wide_weights(np.array([-qp, qp], np.int8)) == (bits == 8)


def test_optimized_session_agrees_with_fake_quant(tmp_path):
    """Logits differ only by the int32 bias rounding, the requantization of the one unfused output and the
    rescaling of the int32 accumulators inside QLinearConv (a code can round the other way): a small fraction of the
    logit range. (Top-1 on real data: tests/test_export_deploy.py.)"""
    model, x = quantized({"0": (8, 8), "3": (4, 4), "5": (4, 4), "9": (8, 8)}, seed=1)
    path = tmp_path / "m.int.onnx"
    export_integer_onnx(model, x[:1], path, [x])
    xt = torch.randn(256, 3, 16, 16)
    sess = session(path)
    got = torch.from_numpy(sess.run(None, {"input": xt.numpy()})[0])
    with torch.no_grad():
        ref = model(xt)
    spread = (ref.max() - ref.min()).item()
    assert (got - ref).abs().max().item() < 0.05 * spread


def test_uniform_policy_exports(tmp_path):
    model = net()
    apply_policy(model, uniform_policy(model, "net", 4, 4))
    x = torch.randn(8, 3, 16, 16)
    calibrate(model, [x])
    stats = export_integer_onnx(model.eval(), x[:1], tmp_path / "m.onnx", [x])
    assert stats.integer_layers == ["0", "3", "5", "9"] and stats.float_layers == []


def test_batchnorms_with_shared_initializers_are_folded(tmp_path):
    """Equal BatchNorm parameters (here: freshly initialised) reach the exported graph through Identity nodes
    (the exporter shares equal initializers); they are folded all the same."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    apply_policy(model, uniform_policy(model, "seq", 8, 8))
    x = torch.randn(4, 3, 8, 8)
    calibrate(model, [x])
    stats = export_integer_onnx(model.eval(), x[:1], tmp_path / "m.onnx", [x], outputs="uint8")
    assert stats.fused_outputs == 1 and stats.requantized_outputs == ["3"]
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)

"""Integer ONNX outputs (gmpq/quant/onnx_outputs.py): ReLU6 bounds and zero pads move onto the uint8 codes
exactly, residual outputs stay exact float through ConvInteger, and onnxruntime's optimized session then agrees
with the fake-quant model up to float32 summation order."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from gmpq.deploy.latency import op_counts, session
from gmpq.errors import UserError
from gmpq.quant import apply_policy, calibrate, make_policy
from gmpq.quant.onnx_integer import act_grid, export_integer_onnx, weight_codes


class Residual(nn.Module):
    """conv0 -> ReLU6 -> zero pad right/bottom -> conv1 (stride 2) = y;  (ReLU -> conv2)(y) + y -> ReLU -> pool -> fc.

    conv0's output reaches conv1's quantizer through ReLU6 and a Pad (absorbed), y has two consumers and conv2
    feeds the Add (float outputs)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv1(nn.functional.pad(nn.functional.relu6(self.conv0(x)), (0, 1, 0, 1)))
        y = y + self.conv2(torch.relu(y))
        return self.fc(torch.relu(y).mean((2, 3)))


def residual_model(w_bits: int = 8, a_bits: int = 8, alpha1: float | None = None):
    """The quantized model, calibrated on 16 random images; ``alpha1``: set conv1's PACT clip level (as
    fine-tuning may leave it, e.g. above ReLU6's 6)."""
    torch.manual_seed(0)
    model = Residual()
    bits = {"conv0": (w_bits, a_bits), "conv1": (w_bits, a_bits), "conv2": (w_bits, a_bits), "fc": (32, None)}
    apply_policy(model, make_policy("residual", {n: {"w_bits": w, "a_bits": a} for n, (w, a) in bits.items()}, "hand"))
    x = 3 * torch.randn(16, 3, 12, 12)
    calibrate(model, [x], seed=0)
    if alpha1 is not None:
        with torch.no_grad():
            model.conv1.a_quant.alpha.fill_(alpha1)
    return model.eval(), x


def ort(path, x, optimize=True):
    if optimize:
        return torch.from_numpy(session(path).run(None, {"input": x.numpy()})[0])
    import onnxruntime as rt

    opts = rt.SessionOptions()
    opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    return torch.from_numpy(rt.InferenceSession(str(path), opts).run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("w_bits", [4, 8])
def test_float_outputs_agree_with_fake_quant_to_float_rounding(tmp_path, w_bits):
    model, x = residual_model(w_bits)
    path = tmp_path / "m.int.onnx"
    stats = export_integer_onnx(model, x[:1], path, [x])
    assert stats.float_outputs == ["conv1", "conv2"] and stats.fused_outputs == 1 and stats.folded_pads == 1
    assert stats.requantized_outputs == []
    session(path, optimized_path=tmp_path / "opt.onnx")
    ops = op_counts(tmp_path / "opt.onnx")
    assert ops["ConvInteger"] == 2 and ops["QLinearConv"] == 1 and "Pad" not in ops and "Conv" not in ops
    # ConvInteger weights: the b-bit codes in uint8 with zero point 128 (onnxruntime's fast exact u8u8 kernel)
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    conv2 = [n for n in m.graph.node if n.op_type == "ConvInteger"][-1]
    assert inits[conv2.input[1]].dtype == np.uint8 and int(inits[conv2.input[3]]) == 128
    assert np.array_equal(inits[conv2.input[1]].astype(np.int16) - 128, weight_codes(model.conv2)[0])
    xt = torch.randn(64, 3, 12, 12)
    with torch.no_grad():
        ref = model(xt)
    # the same integer products; only the float32 summation order differs (and, rarely, a code that lands on a
    # rounding boundary flips by one): far below one step of any grid
    spread = (ref.max() - ref.min()).item()
    for optimize in (False, True):
        assert (ort(path, xt, optimize) - ref).abs().max().item() < 1e-3 * spread


def test_uint8_outputs_requantize_and_differ_more(tmp_path):
    model, x = residual_model(8)
    exact, requant = tmp_path / "f.onnx", tmp_path / "u.onnx"
    export_integer_onnx(model, x[:1], exact, [x])
    stats = export_integer_onnx(model, x[:1], requant, [x], outputs="uint8")
    assert stats.requantized_outputs == ["conv1", "conv2"] and stats.float_outputs == []
    session(requant, optimized_path=tmp_path / "opt.onnx")
    assert op_counts(tmp_path / "opt.onnx")["QLinearConv"] == 3
    xt = torch.randn(64, 3, 12, 12)
    with torch.no_grad():
        ref = model(xt)
    assert (ort(requant, xt) - ref).abs().max() > 10 * (ort(exact, xt) - ref).abs().max()


def test_relu6_below_the_activation_range_becomes_a_code_clip(tmp_path):
    """conv1's PACT alpha above 6: Q(relu6(v)) = clip(Q(v), 0, Q(6)) exactly, so conv0 still ends in conv1's Q."""
    model, x = residual_model(8, alpha1=8.0)
    grid = act_grid(model.conv1)
    assert not model.conv1.a_quant.signed
    path = tmp_path / "m.int.onnx"
    stats = export_integer_onnx(model, x[:1], path, [x])
    assert stats.fused_outputs == 1 and stats.code_clips == 2  # conv0's signed input (codes 1..255) and this one
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    clips = {(int(inits[n.input[1]]), int(inits[n.input[2]])) for n in m.graph.node if n.op_type == "Clip"}
    assert clips == {(1, 255), (0, grid.code(6.0))} and grid.code(6.0) == round(6.0 / grid.scale) == 191
    with torch.no_grad():
        ref = model(x)
    for optimize in (False, True):
        assert (ort(path, x, optimize) - ref).abs().max().item() < 1e-3 * (ref.max() - ref.min()).item()


def test_act_grid_codes_round_half_to_even():
    from gmpq.quant.onnx_graph import ActGrid

    g = ActGrid(0.5, 0, 0, 255)
    assert [g.code(v) for v in (0.25, 0.75, -1.0, 1000.0)] == [0, 2, 0, 255]
    assert ActGrid(0.5, 128, 1, 255).code(-0.25) == 128


def test_unknown_output_mode_is_refused(tmp_path):
    model, x = residual_model(8)
    with pytest.raises(UserError, match=r"outputs='int4'.*\['float', 'uint8'\]"):
        export_integer_onnx(model, x[:1], tmp_path / "m.onnx", [x], outputs="int4")
    assert not (tmp_path / "m.onnx").exists()


def test_nonzero_pads_stay(tmp_path):
    """A Pad whose value is not zero is not folded (it would change the padded border)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(nn.functional.pad(x, (1, 1, 1, 1), value=0.5))

    model = Net()
    apply_policy(model, make_policy("net", {"conv": {"w_bits": 8, "a_bits": 8}}, "hand"))
    x = torch.randn(4, 3, 8, 8)
    calibrate(model, [x])
    stats = export_integer_onnx(model.eval(), x[:1], tmp_path / "m.onnx", [x])
    assert stats.folded_pads == 0
    assert any(n.op_type == "Pad" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    with torch.no_grad():
        assert np.allclose(ort(tmp_path / "m.onnx", x).numpy(), model(x).numpy(), atol=1e-4)

"""The QAT student: quantized attention at 32 vs 4 bits, MSE initialisations against brute force, layer parts."""

from __future__ import annotations

import pytest
import torch

from detr_ptq.models import build_detr, get_preset
from detr_ptq.models.attention import MultiheadAttention
from detr_ptq.qat.config import QATConfig
from detr_ptq.qat.quantize import (
    attention_bits,
    build_student,
    layer_part,
    policy_from_file,
    set_parts_enabled,
    uniform_qat_policy,
)
from gmpq.config import load_config
from gmpq.errors import UserError
from gmpq.quant import functional as F
from gmpq.quant.calibrate import calibrate, require_calibrated
from gmpq.quant.modules import LayerSpec, quantizable_layers, swap_layers
from gmpq.quant.policy import make_policy, save_policy
from gmpq.quant.quantizers import ActQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _attention_pair(bits: int) -> tuple[MultiheadAttention, MultiheadAttention]:
    torch.manual_seed(0)
    ref = MultiheadAttention(16, 4).eval()
    q = MultiheadAttention(16, 4).eval()
    q.load_state_dict(ref.state_dict())
    spec = LayerSpec(w_bits=bits, a_bits=bits, w_method="lsq", a_method="lsq+", extra=(("attn_bits", bits),))
    swap_layers(torch.nn.Sequential(q), {"0": spec})
    return ref, q


def test_quantized_attention_equals_float_at_32_bits_and_differs_at_4():
    x, mem = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    ref, q32 = _attention_pair(32)
    torch.testing.assert_close(q32(x, mem, mem)[0], ref(x, mem, mem)[0], rtol=0, atol=0)
    ref, q4 = _attention_pair(4)
    hooks = ("q_in_quant", "k_in_quant", "v_in_quant", "q_quant", "k_quant", "attn_quant", "v_quant")
    assert all(getattr(q4, h).bits == 4 for h in hooks)

    def fwd(model, batch):
        return model[0](*batch)

    errors = {}
    for bits in (4, 8):
        ref, q = _attention_pair(bits)
        calibrate(torch.nn.Sequential(q), [(x, mem, mem)], forward=fwd)
        want = ref(x, mem, mem)[0]
        errors[bits] = ((q(x, mem, mem)[0] - want).norm() / want.norm()).item()
    assert 0 < errors[8] < errors[4] < 1.0, errors
    # The softmax map is on the 4-bit LSQ+ grid: at most 16 distinct values per tensor.
    seen = {}
    calibrate(torch.nn.Sequential(q4), [(x, mem, mem)], forward=fwd)
    q4.attn_quant.register_forward_hook(lambda m, i, o: seen.setdefault("attn", o))
    q4(x, mem, mem)
    assert seen["attn"].unique().numel() <= 16


def test_mse_step_matches_a_brute_force_search():
    torch.manual_seed(0)
    w = torch.randn(3, 50) * torch.tensor([[0.1], [1.0], [3.0]])
    w[1, 0] = 8.0  # an outlier: clipping it pays at 3 bits
    qmin, qmax = F.signed_range(3, symmetric=False)
    step = F.mse_step(w, qmin, qmax, per_channel=True, grid=80)
    for c in range(3):
        amax = w[c].abs().max()
        errs = [((w[c] - torch.clamp(torch.round(w[c] / s), qmin, qmax) * s) ** 2).sum().item()
                for s in amax * torch.linspace(0.1, 1.0, 80) / qmax]
        best = min(errs)
        got = ((w[c] - torch.clamp(torch.round(w[c] / step[c]), qmin, qmax) * step[c]) ** 2).sum().item()
        assert got == pytest.approx(best, rel=1e-5)
    assert step[1] < 8.0 / qmax  # the outlier channel is clipped


def test_mse_activation_range_beats_minmax_on_a_long_tail():
    torch.manual_seed(0)
    x = torch.cat([torch.rand(50_000), torch.tensor([20.0])])  # a ReLU-like tail
    step, offset = F.mse_step_offset(x, 0.0, 20.0, 4)
    s_mm, o_mm = F.minmax_step_offset(torch.tensor(0.0), torch.tensor(20.0), 4)

    def mse(s, o):
        return ((x - (torch.clamp(torch.round((x - o) / s), 0, 15) * s + o)) ** 2).mean()

    assert mse(step, offset) < 0.2 * mse(s_mm, o_mm)


def test_layer_parts_cover_the_detr_and_uniform_policy_follows_them():
    model, _, _ = build_detr(get_preset("detr_tiny"))
    parts = {n: layer_part(n) for n in quantizable_layers(model)}
    assert parts["backbone.0.body.conv1"] == "first_conv" and parts["input_proj"] == "input_proj"
    assert parts["transformer.decoder.layers.1.multihead_attn.out_proj"] == "decoder_attn"
    assert parts["transformer.decoder.layers.0.linear2"] == "decoder_mlp"
    assert parts["bbox_embed.layers.2"] == "head" and parts["transformer.encoder.layers.0.linear1"] == "encoder"
    cfg = QATConfig(quantize=["backbone", "encoder"], bits="3-3-6", input_proj_bits=5, head_bits=8)
    layers = uniform_qat_policy(model, "detr_tiny", cfg)["layers"]
    assert layers["backbone.0.body.conv1"]["w_bits"] == 8 and layers["input_proj"]["w_bits"] == 5
    assert layers["transformer.encoder.layers.0.self_attn"] == {"w_bits": 3, "a_bits": 3, "part": "encoder",
                                                                  "attn_bits": 6}
    assert layers["transformer.decoder.layers.0.self_attn"]["w_bits"] == 32
    assert layers["class_embed"]["w_bits"] == 8


def test_student_needs_calibration_and_two_stage_switch_disables_parts():
    model, _, _ = build_detr(get_preset("detr_tiny"))
    cfg = QATConfig(query_embed_bits=6, align=True)
    build_student(model, uniform_qat_policy(model, "detr_tiny", cfg), cfg, "detr_tiny")
    with pytest.raises(UserError, match="not calibrated"):
        require_calibrated(model)
    assert model.query_quant.quant.bits == 6
    disabled = set_parts_enabled(model, lambda part: part in ("first_conv", "backbone"))
    assert disabled and all(not n.startswith("backbone.") for n in disabled)
    assert any(n.startswith("query_quant") for n in disabled)


def test_config_shorthand_and_float_strings():
    cfg = load_config(QATConfig, None, ["bits=2-3-8", "lr=5e-4"])
    assert (cfg.w_bits, cfg.a_bits, cfg.attn_bits, cfg.lr) == (2, 3, 8, 5e-4)
    # bits: 4 is W4/A4 with 4-bit attention operands (Q-DETR); attn_bits: 8 is the named 8-bit variant.
    for sets, want in ((["bits=4"], (4, 4, 4)), (["bits=4-3"], (4, 3, 3)), (["bits=3", "attn_bits=8"], (3, 3, 8)),
                       ([], (4, 4, 4))):
        cfg = load_config(QATConfig, None, sets)
        assert (cfg.w_bits, cfg.a_bits, attention_bits(cfg)) == want, sets
    with pytest.raises(UserError, match="'W', 'W-A' or 'W-A-ATTN'"):
        QATConfig(bits="4-4-4-4")
    with pytest.raises(UserError, match=r"attn_bits=1 .*accepted values: \[2, 3, 4, 5, 6, 7, 8, 32\]"):
        QATConfig(attn_bits=1)
    with pytest.raises(UserError, match="stage1_epochs=3 must be in"):
        QATConfig(two_stage=True, stage1_epochs=3, epochs=3)


def test_attention_operands_default_to_the_activation_bits():
    model, _, _ = build_detr(get_preset("detr_tiny"))
    cfg = QATConfig(bits=3)
    policy = uniform_qat_policy(model, "detr_tiny", cfg)
    attn = [n for n, m in quantizable_layers(model).items() if isinstance(m, MultiheadAttention)]
    assert len(attn) == 6 and all(policy["layers"][n]["attn_bits"] == 3 for n in attn)
    build_student(model, policy, cfg, "detr_tiny")
    m = model.transformer.decoder.layers[0].multihead_attn
    assert [getattr(m, h).bits for h in ("q_quant", "k_quant", "attn_quant", "v_quant")] == [3, 3, 3, 3]
    eight = uniform_qat_policy(model, "detr_tiny", QATConfig(bits=3, attn_bits=8))
    assert all(eight["layers"][n]["attn_bits"] == 8 for n in attn)
    recipe = load_config(QATConfig, "recipes/qat_detr_tiny.yaml")
    assert (recipe.w_bits, recipe.a_bits, attention_bits(recipe)) == (4, 4, 4)


def _policy_file(tmp_path, model, edit) -> str:
    layers = {n: {"w_bits": 4, "a_bits": 4} for n in quantizable_layers(model)}
    edit(layers)
    path = tmp_path / "policy.json"
    save_policy(make_policy("detr_tiny", layers, "hand"), path)
    return str(path)


def test_policy_with_attention_bits_the_quantizers_cannot_use_is_refused(tmp_path):
    model, _, _ = build_detr(get_preset("detr_tiny"))
    cross = "transformer.decoder.layers.1.multihead_attn"
    path = _policy_file(tmp_path, model, lambda layers: layers["transformer.decoder.layers.0.linear1"].update(
        attn_bits=4))
    with pytest.raises(UserError, match=r"(?s)policy\.json.*layers\['transformer\.decoder\.layers\.0\.linear1'\]: "
                                        r"attn_bits=4 is given to a layer without attention operands"):
        policy_from_file(path, model, "detr_tiny", QATConfig())
    layers = {n: {"w_bits": 4, "a_bits": 4} for n in quantizable_layers(model)}
    layers[cross]["attn_bits"] = 16
    bad = tmp_path / "bad.json"
    bad.write_text(__import__("json").dumps({"format": "gmpq-policy/1", "model": "detr_tiny",
                                             "created_by": {"method": "hand"}, "layers": layers}))
    with pytest.raises(UserError, match=rf"(?s)bad\.json.*layers\['{cross}'\]: attn_bits=16 is not accepted; "
                                        r"accepted values: \[2, 3, 4, 5, 6, 7, 8, 32\] or null"):
        policy_from_file(str(bad), model, "detr_tiny", QATConfig())
    good = _policy_file(tmp_path, model, lambda layers: layers[cross].update(attn_bits=2))
    assert policy_from_file(good, model, "detr_tiny", QATConfig())["layers"][cross]["attn_bits"] == 2


def test_student_with_every_operand_at_32_bits_equals_the_float_detr():
    """Every layer (attention: weights, the three inputs, q, k, softmax map, v) at 32 bits through the QAT path."""
    torch.manual_seed(0)
    ref, _, _ = build_detr(get_preset("detr_tiny"))
    model, _, _ = build_detr(get_preset("detr_tiny"))
    model.load_state_dict(ref.state_dict())
    layers = {n: {"w_bits": 32, "a_bits": 32, **({"attn_bits": 32} if isinstance(m, MultiheadAttention) else {})}
              for n, m in quantizable_layers(model).items()}
    cfg = QATConfig()
    build_student(model, make_policy("detr_tiny", layers, "hand"), cfg, "detr_tiny")
    attn = model.transformer.decoder.layers[0].multihead_attn
    assert attn.w_quant.bits == 32 and not any(isinstance(q, ActQuantizer) for q in attn.modules())
    images, mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        got, want = model.eval()(images, mask), ref.eval()(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)

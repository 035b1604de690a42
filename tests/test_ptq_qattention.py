"""DETR attention through gmpq.quant: registration, weight and activation quantizers, cost accounting, policies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import detr_ptq.models.qattention  # noqa: F401  (the registration under test)
from detr_ptq.models import build_detr, get_preset
from detr_ptq.models.attention import MultiheadAttention
from detr_ptq.ptq.apply import quantize_detr, uniform_detr_policy
from gmpq.errors import UserError
from gmpq.quant import LayerSpec, WeightQuantizer, cost_summary, measure_macs
from gmpq.quant.functional import symmetric_fake_quant
from gmpq.quant.modules import quantizable_layers, swap_layers
from gmpq.quant.policy import layer_bits

pytestmark = pytest.mark.usefixtures("one_thread")


def _attn() -> MultiheadAttention:
    torch.manual_seed(0)
    m = MultiheadAttention(16, 4)
    with torch.no_grad():
        m.in_proj_bias.normal_(0, 0.1)
    return m.eval()


def test_weight_quantizer_on_in_proj_weight():
    m = _attn()
    x = torch.randn(5, 2, 16)
    ref = _attn()
    with torch.no_grad():
        ref.in_proj_weight.copy_(symmetric_fake_quant(ref.in_proj_weight, 4, per_channel=False))
    q = swap_layers(torch.nn.Sequential(m), {"0": LayerSpec(w_bits=4, per_channel=False)})[0]
    assert q is m and isinstance(m.w_quant, WeightQuantizer) and m.quantized_weights() == [m.in_proj_weight]
    assert all(isinstance(getattr(m, h), torch.nn.Identity)  # weight-only: activation hooks stay identities
               for h in ("a_quant", "q_quant", "k_quant", "attn_quant", "v_quant"))
    torch.testing.assert_close(m(x, x, x)[0], ref(x, x, x)[0], rtol=0, atol=0)
    assert dict(m.named_parameters()).keys() == dict(_attn().named_parameters()).keys()


def test_activation_and_attention_bits_are_supported():
    m = _attn()
    spec = LayerSpec(w_bits=8, a_bits=8, extra=(("attn_bits", 4),))
    swap_layers(torch.nn.Sequential(m), {"0": spec})
    assert m.a_quant.bits == 8 and all(getattr(m, h).bits == 4 for h in ("q_quant", "k_quant", "attn_quant",
                                                                          "v_quant"))
    x = torch.randn(6, 2, 16)
    with pytest.raises(UserError, match="not calibrated"):
        m(x, x, x)
    # gmpq.quant.calibrate feeds single tensors; the attention takes (q, k, v), so drive the observers by hand.
    for q in (m.a_quant, m.q_quant, m.k_quant, m.attn_quant, m.v_quant):
        q.observing = True
    m(x, x, x)
    for q in (m.a_quant, m.q_quant, m.k_quant, m.attn_quant, m.v_quant):
        q.finish_calibration()
    out, weights = m(x, x, x)
    float_out = _attn()(x, x, x)[0]
    assert torch.isfinite(out).all() and not torch.equal(out, float_out)
    assert (out - float_out).abs().max() < 0.5 * float_out.abs().max()


def test_macs_and_cost_count_the_projections():
    cfg = dataclasses.replace(get_preset("detr_tiny"), backbone_widths=[8, 8, 16, 16], hidden_dim=16, nheads=2,
                              dim_feedforward=32, num_queries=5)
    model, _, _ = build_detr(cfg)
    layers = quantizable_layers(model)
    enc = "transformer.encoder.layers.0.self_attn"
    assert enc in layers and f"{enc}.out_proj" in layers
    macs = measure_macs(model, (3, 64, 64))
    tokens = (64 // 16) ** 2
    assert macs[enc] == 3 * tokens * 16 * 16
    assert macs["transformer.decoder.layers.0.multihead_attn"] == (5 + 2 * tokens) * 16 * 16
    policy = uniform_detr_policy(model, cfg.name, 4, ["class_embed", "bbox_embed.*"])
    cost = cost_summary(model, layer_bits(policy, model), (3, 64, 64), macs=macs)
    rows = {r["name"]: r for r in cost["layers"]}
    assert rows[enc]["params"] == 3 * 16 * 16 and rows[enc]["w_bits"] == 4
    quantize_detr(model, policy, cfg.name)
    assert model.transformer.encoder.layers[0].self_attn.w_quant.bits == 4
    assert not hasattr(model.class_embed, "w_quant")  # excluded head stays float


def test_policy_naming_missing_layers_and_activation_bits_are_refused():
    cfg = dataclasses.replace(get_preset("detr_tiny"), backbone_widths=[8, 8, 16, 16], hidden_dim=16, nheads=2,
                              dim_feedforward=32, num_queries=5)
    model, _, _ = build_detr(cfg)
    policy = uniform_detr_policy(model, cfg.name, 4, [])
    policy["layers"]["transformer.encoder.layers.9.linear1"] = {"w_bits": 4, "a_bits": None}
    with pytest.raises(UserError, match=r"not in the model.*layers\.9\.linear1"):
        quantize_detr(model, policy, cfg.name)
    policy = uniform_detr_policy(model, cfg.name, 4, [])
    policy["layers"]["input_proj"]["a_bits"] = 8
    with pytest.raises(UserError, match="weight-only"):
        quantize_detr(model, policy, cfg.name)

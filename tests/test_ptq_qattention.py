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
from gmpq.quant.functional import minmax_step_offset, symmetric_fake_quant
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
               for h in ("q_in_quant", "k_in_quant", "v_in_quant", "q_quant", "k_quant", "attn_quant", "v_quant"))
    torch.testing.assert_close(m(x, x, x)[0], ref(x, x, x)[0], rtol=0, atol=0)
    assert dict(m.named_parameters()).keys() == dict(_attn().named_parameters()).keys()


def test_activation_and_attention_bits_are_supported():
    m = _attn()
    spec = LayerSpec(w_bits=8, a_bits=8, a_method="lsq+", extra=(("attn_bits", 4),))
    swap_layers(torch.nn.Sequential(m), {"0": spec})
    inputs = (m.q_in_quant, m.k_in_quant, m.v_in_quant)
    operands = (m.q_quant, m.k_quant, m.attn_quant, m.v_quant)
    assert all(q.bits == 8 and q.batch_dim == 1 for q in inputs)
    assert all(q.bits == 4 and q.batch_dim == 0 for q in operands)
    assert len({id(q) for q in inputs}) == 3  # one quantizer per input tensor (Eq. 2.26's separate Q-FCs)
    # Three different tensors: a query near 0, keys around 5, values around -3 (tgt + pos, memory + pos, memory).
    x, k, v = torch.randn(6, 2, 16), 5 + torch.randn(9, 2, 16), -3 + torch.randn(9, 2, 16)
    with pytest.raises(UserError, match="not calibrated"):
        m(x, k, v)
    # gmpq.quant.calibrate feeds single tensors; the attention takes (q, k, v), so drive the observers by hand.
    for q in inputs + operands:
        q.observing = True
    m(x, k, v)
    for q in inputs + operands:
        q.finish_calibration()
    # Each input quantizer took the range of its own tensor (LSQ+ min-max init: [min(lo, 0), max(hi, 0)]).
    for q, t in zip(inputs, (x, k, v)):
        step, offset = minmax_step_offset(t.min().clamp(max=0), t.max().clamp(min=1e-4), 8)
        assert (q.step.item(), q.offset.item()) == (step.item(), offset.item())
    assert m.k_in_quant.offset.item() == 0 and m.v_in_quant.offset.item() < -4 < m.q_in_quant.offset.item()
    out, weights = m(x, k, v)
    float_out = _attn()(x, k, v)[0]
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

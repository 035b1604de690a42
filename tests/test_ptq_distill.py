"""Eq. 5 distillation loss: zero value and zero gradient at student == teacher, non-zero Hessian; the three
sensitivity metrics on a small random DETR; twice-differentiability errors name the module."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from detr_ptq.models import build_detr, get_preset
from detr_ptq.ptq.distill import DistillConfig, distill_loss, distill_terms
from detr_ptq.ptq.hutchinson import HutchinsonConfig, probe_all_layers, rademacher_like, traced_weights
from detr_ptq.ptq.sensitivity import METRICS, SensitivityConfig, layer_traces, metric_loss, quantize_reference
from gmpq.errors import UserError
from gmpq.quant.modules import quantizable_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_detr():
    cfg = dataclasses.replace(get_preset("detr_tiny"), backbone_widths=[8, 8, 16, 16], hidden_dim=16, nheads=2,
                              dim_feedforward=32, num_queries=5)
    torch.manual_seed(0)
    model, criterion, _ = build_detr(cfg)
    return model.eval(), criterion


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 48, 48, generator=g)
    mask = torch.zeros(2, 48, 48, dtype=torch.bool)
    mask[1, :, 40:] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}]
    return images, mask, targets


def test_distill_zero_value_zero_gradient_nonzero_hessian():
    model, criterion = _small_detr()
    cfg = SensitivityConfig(metrics=["output-float"])
    student, loss_fn = metric_loss("output-float", model, criterion, cfg)
    layers = traced_weights(student, quantizable_layers(student))
    batch = _batch()
    loss = loss_fn(batch)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    params = [p for ps in layers.values() for p in ps]
    grads = torch.autograd.grad(loss, params)
    assert max(float(g.abs().max()) for g in grads) < 1e-7
    vec = {n: rademacher_like(ps, torch.Generator().manual_seed(0)) for n, ps in layers.items()}
    per_layer = probe_all_layers(loss_fn(batch), layers, vec)
    # At the minimum the Hessian is positive semi-definite, so v^T H v >= 0 for every probe, and > 0 here.
    assert sum(per_layer.values()) > 1e-6


def test_distill_terms_cover_final_and_aux_outputs():
    model, _ = _small_detr()
    images, mask, _ = _batch()
    with torch.no_grad():
        t = model(images, mask)
        s = model(images + 0.1, mask)
    terms = distill_terms(s, t, temperature=6.0)
    n_out = 1 + len(t["aux_outputs"])
    assert {f"kl_{i}" for i in range(n_out)} <= set(terms) and f"kl_{n_out}" not in terms
    assert float(terms["kl"]) > 0 and float(terms["l1"]) > 0
    total = distill_loss(s, t, DistillConfig(temperature=6.0, lambda_kl=0.05))
    assert float(total) == pytest.approx(0.05 * float(terms["kl"]) + float(terms["l1"]), rel=1e-6)


def test_all_metrics_trace_every_layer_including_frozen_ones():
    model, criterion = _small_detr()
    cfg = SensitivityConfig(hutchinson=HutchinsonConfig(max_probes=2, min_probes=1))
    names = list(quantizable_layers(model))
    assert "backbone.0.body.conv1" in names and "transformer.encoder.layers.0.self_attn" in names
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for metric in METRICS:
        res = layer_traces(model, criterion, [_batch()], metric, cfg)
        assert set(res["layers"]) == set(names)
        assert all(torch.isfinite(torch.tensor(r["trace"])) for r in res["layers"].values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the float model is untouched


def test_output_quant_student_sits_on_the_8bit_grid():
    model, _ = _small_detr()
    w = model.transformer.encoder.layers[0].linear1.weight.detach().clone()
    quantize_reference(model, 8, exclude=["class_embed"])
    q = model.transformer.encoder.layers[0].linear1.weight.detach()
    step = w.abs().max() / 127
    assert torch.allclose(q / step, torch.round(q / step), atol=1e-3)
    assert not torch.equal(q, w)


class _OnceOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _Square(nn.Module):
    def forward(self, x):
        return _OnceOnly.apply(x)


def test_not_twice_differentiable_names_the_module():
    model, criterion = _small_detr()
    layer = model.transformer.encoder.layers[0]
    layer.linear1 = nn.Sequential(layer.linear1, _Square())
    cfg = SensitivityConfig(hutchinson=HutchinsonConfig(max_probes=1, min_probes=1))
    with pytest.raises(UserError, match=r"module 'transformer\.encoder\.layers\.0\.linear1\.1' \(_Square\)"):
        layer_traces(model, criterion, [_batch()], "loss", cfg)

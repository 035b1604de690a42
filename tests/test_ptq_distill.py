"""Eq. 5 distillation loss: zero value and zero gradient at student == teacher, non-zero Hessian; the three
sensitivity metrics on a small random DETR; twice-differentiability errors name the module."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from detr_ptq.data.digits_coco import make_digits_coco
from detr_ptq.models import build_detr, get_preset
from detr_ptq.ptq.apply import load_float
from detr_ptq.ptq.calibset import CalibConfig, calibration_loader, load_batches
from detr_ptq.ptq.distill import DistillConfig, distill_loss, distill_terms
from detr_ptq.ptq.hutchinson import (
    HutchinsonConfig,
    hutchpp_per_layer,
    probe_all_layers,
    probe_per_layer,
    rademacher_like,
    traced_weights,
)
from detr_ptq.ptq.sensitivity import METRICS, SensitivityConfig, layer_traces, metric_loss, quantize_reference
from gmpq.errors import UserError
from gmpq.quant.modules import quantizable_layers

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = Path(os.environ.get("DETR_PTQ_REFERENCE") or
                 Path(__file__).resolve().parent.parent / "detr_ptq" / "assets" / "detr_tiny_digits.pth")


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


def _student_teacher_outputs():
    """Outputs of the small DETR on the batch (teacher) and on the batch shifted by 0.1 (student)."""
    model, _ = _small_detr()
    images, mask, _ = _batch()
    with torch.no_grad():
        return model(images + 0.1, mask), model(images, mask)


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
    # ... and so is every diagonal block: per-layer probes never give a negative sample (up to rounding).
    samples = probe_per_layer(loss_fn(batch), layers, torch.Generator().manual_seed(1), probes=2)
    scale = max(float(s.abs().max()) for s in samples.values())
    assert min(float(s.min()) for s in samples.values()) >= -1e-6 * scale
    hpp = hutchpp_per_layer(loss_fn(batch), layers, torch.Generator().manual_seed(1), k=2)
    assert min(hpp.values()) >= -1e-6 * max(hpp.values()) and max(hpp.values()) > 0


def test_distill_terms_cover_final_and_aux_outputs():
    s, t = _student_teacher_outputs()
    terms = distill_terms(s, t, temperature=6.0)
    n_out = 1 + len(t["aux_outputs"])
    assert {f"kl_{i}" for i in range(n_out)} <= set(terms) and f"kl_{n_out}" not in terms
    assert float(terms["kl"]) > 0 and float(terms["l1"]) > 0
    total = distill_loss(s, t, DistillConfig(temperature=6.0, lambda_kl=0.05, box_loss="l1"))  # Eq. 5 as written
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


def test_smooth_box_term_matches_huber_and_keeps_eq5_value():
    s, t = _student_teacher_outputs()
    terms = distill_terms(s, t, temperature=6.0, box_beta=0.02)
    r = torch.cat([(a["pred_boxes"] - b["pred_boxes"]).flatten() for a, b in zip([s] + s["aux_outputs"],
                                                                                   [t] + t["aux_outputs"])])
    huber = torch.where(r.abs() < 0.02, r * r / (2 * 0.02), r.abs() - 0.01)
    n_queries = s["pred_boxes"].shape[0] * s["pred_boxes"].shape[1]
    assert float(terms["smooth_l1"]) == pytest.approx(float(huber.sum()) / n_queries, rel=1e-5)
    cfg = DistillConfig(lambda_kl=0.05, box_beta=0.02)
    assert float(distill_loss(s, t, cfg)) == pytest.approx(0.05 * float(terms["kl"]) + float(terms["smooth_l1"]))
    assert float(distill_loss(s, t, cfg, box_loss="l1")) == pytest.approx(0.05 * float(terms["kl"]) +
                                                                          float(terms["l1"]))
    with pytest.raises(ValueError, match=r"box_loss='l2' is unknown; accepted: \['smooth_l1', 'l1'\]"):
        DistillConfig(box_loss="l2")


def _reference_batch():
    """Two training images of the reference detector's digits dataset (seed 0), at its 96-px size."""
    with tempfile.TemporaryDirectory() as d:
        make_digits_coco(d, seed=0, num_train=2, num_val=0)
        loader, _ = calibration_loader(CalibConfig(data_dir=d, num_images=2, batch_size=2), 96, 96)
        return load_batches(loader)[0]


def test_box_term_alone_has_positive_traces_on_the_reference_detector():
    """The box term alone (lambda_KL = 0). With L1 its Hessian is exactly 0 at student == teacher; with the
    Smooth-L1 surrogate at W_q8 every layer's per-layer probe sees a positive curvature (Gauss-Newton J^T J / beta
    plus a small residual term)."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference checkpoint {REFERENCE} is missing")
    model, criterion, _, _ = load_float(REFERENCE)
    batch = _reference_batch()
    cases = {("output-quant", "smooth_l1"): "positive", ("output-float", "l1"): "zero"}
    for (metric, box), expect in cases.items():
        cfg = SensitivityConfig(distill=DistillConfig(lambda_kl=0.0, box_loss=box))
        student, loss_fn = metric_loss(metric, model, criterion, cfg)
        layers = traced_weights(student, quantizable_layers(student))
        samples = probe_per_layer(loss_fn(batch), layers, torch.Generator().manual_seed(0), probes=2)
        assert len(samples) == 45
        assert bool((samples.pop("class_embed") == 0).all())  # the box term does not reach the class head
        if expect == "zero":
            assert all(bool((s == 0).all()) for s in samples.values()), metric
        else:
            assert all(bool((s > 0).all()) for s in samples.values()), {n: s for n, s in samples.items()
                                                                         if (s <= 0).any()}

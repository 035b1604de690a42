"""Grad-CAM: the student map is differentiable w.r.t. the importance logits; the closed-form CAM equals autograd."""

from __future__ import annotations

import torch

from gmpq.models import create_model, model_spec
from gmpq.quant.calibrate import calibrate
from gmpq.search import losses as L
from gmpq.search.gradcam import cam_closed_form, capture_features, grad_cam, student_attribution, teacher_attribution
from gmpq.search.hypernet import arch_parameters, build_hypernet


def _hypernet(dtype=torch.float32):
    spec = model_spec("small_cnn")
    teacher = create_model("small_cnn").eval().to(dtype)
    model = create_model("small_cnn").to(dtype)
    model.load_state_dict(teacher.state_dict())
    build_hypernet(model, [2, 3, 4], [2, 3, 4], exclude=[spec.first_layer, spec.classifier])
    x = torch.randn(6, 1, 16, 16, dtype=dtype)
    calibrate(model, [x], num_batches=1)
    with torch.no_grad():
        for p in arch_parameters(model):
            p.copy_(torch.randn_like(p))
    return spec, teacher, model.train(), x, torch.arange(6) % 10


def _student_loss(spec, teacher, model, x, y, fast: bool):
    with capture_features(model, spec.feature_layer) as store:
        logits = model(x)
    fc = teacher.get_submodule(spec.classifier).weight if fast else None
    t_map, target, _ = teacher_attribution(teacher, x, y, spec.feature_layer, "label", fc)
    fc_s = model.get_submodule(spec.classifier).weight if fast else None
    s_map = student_attribution(store["features"], logits, target, (16, 16), fc_s)
    return s_map, t_map, L.attribution_loss(s_map, t_map, 2.0, topk=1000)


def test_student_gradcam_gradient_reaches_importance_logits():
    spec, teacher, model, x, y = _hypernet()
    _, _, loss = _student_loss(spec, teacher, model, x, y, fast=False)
    loss.backward()
    grads = [p.grad for p in arch_parameters(model)]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_closed_form_cam_equals_autograd_gradcam_values_and_gradients():
    spec, teacher, model, x, y = _hypernet(torch.float64)  # float64: the two paths differ only by rounding
    torch.manual_seed(1)
    s_auto, t_auto, loss_auto = _student_loss(spec, teacher, model, x, y, fast=False)
    g_auto = torch.autograd.grad(loss_auto, arch_parameters(model) + [model.conv4.conv.weight])
    torch.manual_seed(1)
    s_fast, t_fast, loss_fast = _student_loss(spec, teacher, model, x, y, fast=True)
    g_fast = torch.autograd.grad(loss_fast, arch_parameters(model) + [model.conv4.conv.weight])
    torch.testing.assert_close(t_fast, t_auto, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_fast, s_auto, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fast, g_auto):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_gradcam_on_a_linear_head_by_hand():
    feats = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(5, 3)
    logits = feats.mean(dim=(2, 3)) @ w.T
    target = torch.tensor([1, 4])
    cam = grad_cam(feats, logits, target, create_graph=False)
    torch.testing.assert_close(cam, cam_closed_form(feats, w, target))
    by_hand = torch.relu(torch.einsum("c,chw->hw", w[4] / 16, feats[1]))
    torch.testing.assert_close(cam[1], by_hand)

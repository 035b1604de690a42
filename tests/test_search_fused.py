"""The fused mixtures (``gmpq.search.fused``) against the reference (the explicit sum of quantized copies).

Forward values must be bit-identical; gradients (input, weight, bias, importance logits, PACT clips), second
derivatives (create_graph, as the autograd Grad-CAM needs) and a whole fixed-seed search run must agree to within
floating-point reassociation, including values exactly on the clip levels and on the ends of the weight grid.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gmpq.models import create_model
from gmpq.quant.calibrate import calibrate
from gmpq.quant.cost import measure_macs
from gmpq.runtime.terms import weighted_total
from gmpq.search.config import LossConfig, SearchConfig
from gmpq.search.gradcam import grad_cam
from gmpq.search.hypernet import argmax_bits, build_hypernet, calibrate_hypernet, mixed_layers
from gmpq.search.losses import loss_weights
from gmpq.search.mixed import MixedConv2d, MixedLinear
from gmpq.search.setup import freeze
from gmpq.search.train import SearchState, build_optimizer, compute_losses

LAYERS = {
    "conv": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv_strided_grouped_bias": lambda: nn.Conv2d(6, 9, 3, stride=2, padding=1, groups=3, bias=True),
    "linear": lambda: nn.Linear(6, 5),
}


def _pair(kind: str, x: torch.Tensor, w_bits=(2, 3, 4), a_bits=(2, 4, 8)):
    """A reference and a fused mixed layer with the same (float64) state, calibrated on ``x``, random logits."""
    torch.manual_seed(0)
    float_layer = LAYERS[kind]().double()
    cls = MixedLinear if kind == "linear" else MixedConv2d
    ref = cls.from_float(float_layer, w_bits, a_bits, impl="reference").double()
    calibrate(ref, [x], num_batches=1)
    with torch.no_grad():
        ref.alpha_w.copy_(torch.randn_like(ref.alpha_w))
        ref.alpha_a.copy_(torch.randn_like(ref.alpha_a))
        for j, q in enumerate(ref.a_quants):  # distinct clips per candidate
            q.alpha.mul_(0.6 + 0.3 * j)
    fused = cls.from_float(LAYERS[kind]().double(), w_bits, a_bits, impl="fused").double()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _input(kind: str, signed: bool) -> torch.Tensor:
    shape = (7, 6) if kind == "linear" else (3, 6, 7, 7)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x if signed else x.relu()


def _put_on_levels(x: torch.Tensor, m) -> torch.Tensor:
    """``x`` with values exactly on every clip level (alpha_j, -alpha_j, 0) and just beside them."""
    x = x.clone()
    levels = [0.0] + [v for q in m.a_quants for v in (float(q.alpha.detach()), -float(q.alpha.detach()))]
    flat = x.view(-1)
    for k, v in enumerate(levels):
        flat[3 * k:3 * k + 3] = torch.tensor([v, torch.nextafter(torch.tensor(v), torch.tensor(9.0)).item(),
                                              torch.nextafter(torch.tensor(v), torch.tensor(-9.0)).item()])
    return x


def _put_weights_on_grid_ends(m) -> None:
    """Power-of-two steps (exact divisions) and weights exactly on each candidate's qmin and qmax."""
    with torch.no_grad():
        m.w_steps.copy_(torch.tensor([2.0**-3, 2.0**-4, 2.0**-5], dtype=m.w_steps.dtype)[:, None].expand_as(m.w_steps))
        flat = m.weight.view(-1)
        for i, b in enumerate(m.w_bits):
            qp = 2 ** (b - 1) - 1
            flat[2 * i:2 * i + 2] = torch.tensor([qp, -qp - 1], dtype=flat.dtype) * m.w_steps[i, 0]
        m.w_amax.copy_(m._amax())  # scale factor exactly 1


def _values_and_grads(m, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = m(x)
    cot = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
    params = [x, m.weight, m.alpha_w, m.alpha_a, *[q.alpha for q in m.a_quants]]
    params += [m.bias] if m.bias is not None else []
    return y, torch.autograd.grad((y * cot).sum(), params)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("signed", [False, True])
def test_fused_equals_reference_values_and_gradients(kind, signed):
    x = _input(kind, signed)
    ref, fused = _pair(kind, x)
    assert bool(ref.a_quants[0].signed) == signed
    x = _put_on_levels(x, ref)
    _put_weights_on_grid_ends(ref)
    fused.load_state_dict(ref.state_dict())
    y_ref, g_ref = _values_and_grads(ref, x)
    y_fused, g_fused = _values_and_grads(fused, x)
    torch.testing.assert_close(y_fused, y_ref, rtol=0, atol=0)  # same ops in the same order: bit-identical
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_channels_last_input_gives_the_same_values_and_gradients():
    x = _input("conv", signed=True)
    ref, fused = _pair("conv", x)
    y_ref, g_ref = _values_and_grads(ref, x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y_fused, g_fused = _values_and_grads(fused, x_cl)
    with torch.no_grad():  # the mixture itself is bit-identical; the convolution may sum in another order
        torch.testing.assert_close(fused.mixed_input(x_cl), ref.mixed_input(x), rtol=0, atol=0)
    torch.testing.assert_close(y_fused, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_tie_gradients_are_the_references_halves():
    """A value exactly on alpha gets half the x-gradient and half the clip gradient (torch.minimum's tie rule)."""
    x = _input("linear", signed=False)
    ref, fused = _pair("linear", x, w_bits=(8,), a_bits=(2,))
    a = float(ref.a_quants[0].alpha.detach())
    x = torch.tensor([[a, 2 * a, a / 2, 0.0, -1.0, a]], dtype=torch.float64).requires_grad_(True)
    with torch.no_grad():
        out = fused.mixed_input(x)
    gx, ga = torch.autograd.grad(fused.mixed_input(x).sum(), [x, fused.a_quants[0].alpha])
    assert out[0, 1] == out[0, 0] == out[0, 5] and out[0, 4] == out[0, 3] == 0  # clipped above; below 0
    assert gx.tolist() == [[0.5, 0.0, 1.0, 0.0, 0.0, 0.5]]
    assert ga.item() == 2.0  # 1/2 + 1 + 1/2


def test_second_derivatives_equal_reference():
    """Grad-CAM through a mixed layer (create_graph=True): the loss on the map differentiates the backward."""
    x = _input("conv", signed=True)
    results = []
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten())
        build_hypernet(model, [2, 4], [3, 4], impl=impl).double()
        calibrate(model, [x], num_batches=1)
        with torch.no_grad():
            for m in (model[0], model[2]):
                m.alpha_a.copy_(torch.tensor([0.3, -0.2]))
                m.alpha_w.copy_(torch.tensor([-0.1, 0.4]))
        feats = model[1](model[0](x))
        logits = model[4](model[3](model[2](feats)))
        cam = grad_cam(feats, logits, torch.tensor([0, 1, 3]), create_graph=True)
        params = [p for p in model.parameters()]
        results.append(torch.autograd.grad(cam.square().sum() + logits.sum(), params))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_uncalibrated_fused_layer_raises_the_quantizers_error():
    m = MixedConv2d.from_float(nn.Conv2d(3, 4, 3), [2], [2, 4], impl="fused")
    with pytest.raises(Exception, match="not calibrated"):
        m(torch.randn(1, 3, 5, 5))


@pytest.fixture(scope="module")
def calibrated_search():
    """A float64 small_cnn teacher, its hypernet (calibrated, weight steps fitted once: the fit is the slow part)
    and a fixed batch."""
    torch.manual_seed(0)
    teacher = freeze(create_model("small_cnn").double())
    model = create_model("small_cnn")
    model.load_state_dict(teacher.state_dict())
    build_hypernet(model, [2, 3, 4], [2, 3, 4], exclude=["conv1.conv", "fc"]).double()
    x = torch.randn(8, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    calibrate_hypernet(model, [x], num_batches=1)
    return teacher, model, x, torch.arange(8) % 10


def _search_steps(setup, impl: str, layer: str, fast: bool, steps: int = 3) -> tuple[list[dict], dict]:
    """``steps`` search steps (CE + zeta R_C + eta R_G, Adam) of a copy of the hypernet on the fixed batch."""
    teacher, model, x, y = setup
    model = copy.deepcopy(model)
    for m in mixed_layers(model).values():
        m.impl = impl
    cfg = SearchConfig(model="small_cnn", loss=LossConfig(eta=1.0, attribution_layer=layer, cam_fast_path=fast))
    s = SearchState(cfg=cfg, model=model.train(), teacher=teacher, macs=measure_macs(create_model("small_cnn"),
                                                                                     (1, 16, 16)),
                    fixed_bops=0.0, layer=layer, fc_student=model.fc if fast else None,
                    fc_teacher=teacher.fc if fast else None)
    opt = build_optimizer(model, cfg)
    history = []
    for _ in range(steps):
        terms, extra = compute_losses(s, x, y)
        total = weighted_total(terms, loss_weights(cfg.loss.zeta, cfg.loss.eta))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in (terms | extra | {"total": total}).items()})
    probs = {n: (m.w_probs().tolist(), m.a_probs().tolist()) for n, m in mixed_layers(model).items()}
    return history, {"bits": argmax_bits(model), "probs": probs}


@pytest.mark.parametrize("layer,fast", [("conv5", True), ("conv3", False)])
def test_fixed_seed_search_steps_are_the_same_with_both_implementations(calibrated_search, layer, fast):
    """Three search steps give the same losses, importance probabilities and policy. ``conv3`` with autograd
    Grad-CAM differentiates through the mixed ``conv4`` and ``conv5`` twice (create_graph)."""
    hist_r, pol_r = _search_steps(calibrated_search, "reference", layer, fast)
    hist_f, pol_f = _search_steps(calibrated_search, "fused", layer, fast)
    assert hist_r[-1]["attribution"] > 0
    for step_r, step_f in zip(hist_r, hist_f):
        for k, v in step_r.items():
            assert step_f[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert pol_f["bits"] == pol_r["bits"]
    for n, (pw, pa) in pol_r["probs"].items():
        assert pol_f["probs"][n][0] == pytest.approx(pw, abs=1e-6)
        assert pol_f["probs"][n][1] == pytest.approx(pa, abs=1e-6)
    moved = max(abs(a - 1 / 3) for pw, pa in pol_r["probs"].values() for a in pw + pa)
    assert moved > 1e-4  # the steps did move the importance logits

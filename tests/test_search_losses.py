"""Loss terms against hand-computed values: complexity (penalty and target), capacity p, top-k attribution."""

from __future__ import annotations

import pytest
import torch

from gmpq.runtime.terms import term_grad_norms, weighted_total
from gmpq.search import losses as L


def _ebits(pairs):
    return {f"l{i}": (torch.tensor(float(w), requires_grad=True), torch.tensor(float(a), requires_grad=True))
            for i, (w, a) in enumerate(pairs)}


def test_complexity_penalty_hand_computed():
    ebits = _ebits([(3, 3), (2, 4)])
    macs = {"l0": 100, "l1": 300}
    expected = (100 * 9 + 300 * 8) / (400 * 32 * 32)
    loss = L.complexity_loss(ebits, macs)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert ebits["l1"][0].grad.item() == pytest.approx(300 * 4 / (400 * 1024))


def test_complexity_target_mode_zero_below_budget_linear_above():
    ebits, macs = _ebits([(4, 4)]), {"l0": 1000}
    bops = 1000 * 16
    fixed = 500.0
    below = L.complexity_loss(ebits, macs, "target", target_bops=bops + fixed + 1, fixed_bops=fixed)
    assert below.item() == 0.0
    above = L.complexity_loss(ebits, macs, "target", target_bops=bops + fixed - 2048, fixed_bops=fixed)
    assert above.item() == pytest.approx(2048 / (1000 * 1024))


def test_capacity_p_formula_and_detached():
    ebits = _ebits([(4, 6), (2, 3)])
    p = L.capacity_p(ebits, qw0=4, qa0=6)
    assert p.item() == pytest.approx(((4 / 4) * (6 / 6) + (4 / 2) * (6 / 3)) / 2)
    assert not p.requires_grad


def test_expected_bits_of_uniform_candidates():
    from torch import nn

    from gmpq.search.hypernet import build_hypernet, expected_bits

    model = build_hypernet(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1)), [2, 3, 4, 5], [2, 8])
    for ew, ea in expected_bits(model).values():
        assert ew.item() == pytest.approx(3.5) and ea.item() == pytest.approx(5.0)


def test_attribution_zero_when_student_matches_teacher_power():
    t = torch.rand(3, 4, 5) + 0.1
    p = 2.0
    assert L.attribution_loss(t**p, t, p, topk=1000).item() == pytest.approx(0.0, abs=1e-12)
    assert L.attribution_loss(t, t, 1.0).item() == pytest.approx(0.0, abs=1e-12)


def test_attribution_hand_computed_topk():
    teacher = torch.tensor([[[4.0, 1.0], [2.0, 0.0]]])  # top-2: pixels 4 and 2
    student = torch.tensor([[[1.0, 5.0], [3.0, 7.0]]])  # at those pixels: 1 and 3
    target = torch.tensor([16.0, 4.0]) / 10  # p = 2, scaled to mean 1
    pred = torch.tensor([1.0, 3.0]) / 2
    expected = ((pred - target) ** 2).mean()
    assert L.attribution_loss(student, teacher, 2.0, topk=2).item() == pytest.approx(expected.item())


def test_topk_capped_by_pixel_count():
    teacher, student = torch.rand(2, 8, 8), torch.rand(2, 8, 8)
    # k = 1000 > 64 pixels: the same as comparing all 64
    assert L.attribution_loss(student, teacher, 1.5, topk=1000).item() == pytest.approx(
        L.attribution_loss(student, teacher, 1.5, topk=64).item())


def test_weighted_total_and_eta_zero():
    terms = {"ce": torch.tensor(2.0), "complexity": torch.tensor(0.5), "attribution": torch.tensor(3.0)}
    assert weighted_total(terms, L.loss_weights(zeta=2.0, eta=0.0)).item() == pytest.approx(3.0)
    assert weighted_total(terms, L.loss_weights(zeta=2.0, eta=0.1)).item() == pytest.approx(3.3)


def test_attribution_size_does_not_depend_on_input_size_or_k():
    g = torch.Generator().manual_seed(0)
    t, s = torch.rand(2, 4, 4, generator=g, dtype=torch.float64), torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    small = L.attribution_loss(s, t, 1.5, topk=16)
    big = L.attribution_loss(s.repeat_interleave(8, 1).repeat_interleave(8, 2),  # the same maps at 32 x 32
                             t.repeat_interleave(8, 1).repeat_interleave(8, 2), 1.5, topk=1024)
    torch.testing.assert_close(big, small, rtol=1e-12, atol=0)
    assert L.attribution_loss(3.0 * s, t, 1.5, topk=16).item() == pytest.approx(small.item())  # scale-free


def test_term_grad_norms_equal_autograd_per_weighted_term():
    a = torch.tensor([0.3, -0.2], requires_grad=True)
    terms = {"ce": (a**2).sum(), "complexity": 3 * a[0], "attribution": torch.zeros(())}
    norms = term_grad_norms(terms, {"ce": 1.0, "complexity": 2.0, "attribution": 0.5}, [a])
    assert norms["ce"] == pytest.approx(float(torch.linalg.norm(2 * a.detach())))
    assert norms["complexity"] == pytest.approx(6.0) and norms["attribution"] == 0.0
    shares = L.grad_shares(norms)
    assert sum(shares.values()) == pytest.approx(1.0) and shares["attribution"] == 0.0

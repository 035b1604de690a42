"""The bit-allocation ILP: equals brute force on small random problems, keeps its budgets, fails clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from detr_ptq.ptq.allocate import AllocateConfig, allocate, allocation_noise, clean_traces, default_candidates
from detr_ptq.ptq.ilp import brute_force, solve_bit_allocation
from gmpq.errors import UserError
from gmpq.quant.functional import symmetric_fake_quant
from gmpq.quant.policy import resolve_policy


def _problem(seed: int, layers: int = 5, bits=(3, 4, 5, 6)):
    rng = np.random.default_rng(seed)
    params = rng.integers(10, 1000, layers).astype(float)
    # Omega decreasing in bits (as quantization error), random sensitivities spanning decades.
    base = rng.uniform(0.5, 2.0, (layers, 1)) * 4.0 ** -(np.asarray(bits)[None, :] - bits[0])
    omega = base * 10 ** rng.uniform(-3, 3, (layers, 1))
    return omega, params, list(bits)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("target", [3.5, 4.0, 4.6, 5.5])
def test_ilp_equals_brute_force_and_holds_the_budget(seed, target):
    omega, params, bits = _problem(seed)
    sol = solve_bit_allocation(omega, params, bits, target)
    best_obj, _ = brute_force(omega, params, bits, target)
    assert sol["status"] == "optimal"
    assert sol["objective"] == pytest.approx(best_obj, rel=1e-9, abs=1e-12)
    assert sol["avg_bits"] <= target + 1e-9
    assert sol["avg_bits"] == pytest.approx((params * np.asarray(sol["bits"])).sum() / params.sum())
    assert len(sol["bits"]) == len(params) and set(sol["bits"]) <= set(bits)


def test_flat_omega_fills_the_budget():
    """Layers with zero trace tie at every bit-width: the second stage still uses the budget."""
    omega, params, bits = _problem(0)
    omega[:2] = 0.0
    sol = solve_bit_allocation(omega, params, bits, 5.0)
    assert sol["objective"] == pytest.approx(brute_force(omega, params, bits, 5.0)[0], abs=1e-12)
    unfilled = solve_bit_allocation(omega, params, bits, 5.0, fill_budget=False)
    assert sol["avg_bits"] >= unfilled["avg_bits"] - 1e-12


def test_size_and_bops_budgets_hold():
    omega, params, bits = _problem(3)
    macs = np.random.default_rng(0).integers(100, 10_000, len(params)).astype(float)
    size_cap = 0.9 * (params * 6).sum()
    bops_cap = 0.8 * (macs * 6 * 32).sum()
    sol = solve_bit_allocation(omega, params, bits, 6.0, max_size_bits=size_cap, bops_per_bit=macs * 32,
                               max_bops=bops_cap)
    b = np.asarray(sol["bits"])
    assert (params * b).sum() <= size_cap + 1e-6
    assert (macs * 32 * b).sum() <= bops_cap + 1e-6


def test_infeasible_target_names_the_feasible_range():
    omega, params, bits = _problem(1)
    with pytest.raises(UserError, match=r"feasible targets are 3 to 6"):
        solve_bit_allocation(omega, params, bits, 2.5)
    with pytest.raises(UserError, match=r"model size.*feasible average-bit targets are 3 to 6"):
        solve_bit_allocation(omega, params, bits, 5.0, max_size_bits=2.0 * params.sum())


def test_paper_candidate_bits():
    assert default_candidates(4) == [3, 4, 5, 6] and default_candidates(5) == [3, 4, 5, 6]
    assert default_candidates(6) == [4, 5, 6, 7]


def test_trace_rules_nan_errors_negative_clamps():
    with pytest.raises(UserError, match=r"non-finite.*\['b', 'c'\]"):
        clean_traces({"a": 1.0, "b": float("nan"), "c": float("inf")}, ["a", "b", "c"])
    with pytest.warns(UserWarning, match="1 of 2 layer\\(s\\) have a negative trace.*clamped to 0"):
        t, clamped = clean_traces({"a": 1.0, "b": -2.0}, ["a", "b"])
    assert t.tolist() == [1.0, 0.0] and clamped == ["b"]
    with pytest.warns(UserWarning, match="magnitude"):
        t, _ = clean_traces({"a": 1.0, "b": -2.0}, ["a", "b"], rule="abs")
    assert t.tolist() == [1.0, 2.0]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 8)
        self.class_embed = nn.Linear(8, 4)

    def forward(self, x):
        return self.class_embed(self.fc(self.conv(x).mean((2, 3))))


def test_allocate_writes_a_covering_policy_with_omega_from_eq6():
    torch.manual_seed(0)
    net = _Net()
    sens = {"metrics": {"output-quant": {"layers": {
        n: {"trace": t, "avg_trace": t / m.weight.numel(), "stderr": 0.1}
        for (n, m), t in zip([("conv", net.conv), ("fc", net.fc), ("class_embed", net.class_embed)],
                             [5.0, 50.0, 1.0])}}}}
    cfg = AllocateConfig(metric="output-quant", target_bits=4.0, input_size=[3, 8, 8], exclude=["class_embed"])
    policy = allocate(net, sens, cfg, "net")
    resolved = resolve_policy(policy, net)  # covers every quantizable layer of the model
    assert resolved["class_embed"]["w_bits"] == 32 and resolved["class_embed"]["a_bits"] is None
    assert policy["created_by"]["method"] == "hessian-ilp"
    assert policy["summary"]["avg_w_bits"] <= 4.0 + 1e-9
    w = net.fc.weight.detach()
    expect = 50.0 / w.numel() * float((symmetric_fake_quant(w, 3) - symmetric_fake_quant(w, 8)).pow(2).sum())
    assert policy["layers"]["fc"]["omega"]["3"] == pytest.approx(expect, rel=1e-6)
    assert policy["layers"]["fc"]["stderr"] == 0.1 and policy["summary"]["noise"]["draws"] == 20
    with pytest.raises(UserError, match="no metric 'loss'"):
        allocate(net, sens, AllocateConfig(metric="loss"), "net")


def dp_bit_allocation(omega: np.ndarray, params: np.ndarray, bits, target: float) -> float:
    """Independent exact reference: a dynamic program over the integer budget sum params * (bits - min bits)
    (params are integers here), minimum objective over every allocation with average bits <= target."""
    params = np.asarray(params, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.int64)
    cap = int(np.floor(target * params.sum() + 1e-9)) - int(bits.min() * params.sum())
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    for row, n in zip(omega, params):
        new = np.full(cap + 1, np.inf)
        for cost, b in zip(row, bits):
            w = int(n * (b - bits.min()))
            if w <= cap:
                new[w:] = np.minimum(new[w:], best[:cap + 1 - w] + cost)
        best = new
    return float(best.min())


def _wide_problem(seed: int, layers: int, decades: float = 8.0):
    """Integer parameter counts, Omega ~ n 4^-b times sensitivities spread over ``decades`` orders of magnitude
    (the regime where an ILP scaled by the largest Omega stopped early: 6 of 20 such 100-layer instances)."""
    rng = np.random.default_rng(seed)
    params = rng.integers(1, 60, layers)
    bits = np.asarray([3, 4, 5, 6])
    err = params[:, None] * 4.0 ** -(bits[None, :] - 3) * rng.uniform(0.5, 2.0, (layers, 1))
    return err * 10 ** rng.uniform(-decades, 0, (layers, 1)), params, [3, 4, 5, 6]


@pytest.mark.parametrize("seed", range(6))
def test_ilp_exact_against_brute_force_when_omega_spans_eight_decades(seed):
    omega, params, bits = _wide_problem(100 + seed, layers=6)
    for target in (3.5, 4.0, 4.5):
        sol = solve_bit_allocation(omega, params.astype(float), bits, target)
        best, _ = brute_force(omega, params.astype(float), bits, target)
        assert sol["objective"] == pytest.approx(best, rel=1e-12)
        assert dp_bit_allocation(omega, params, bits, target) == pytest.approx(best, rel=1e-12)  # the DP is right


@pytest.mark.parametrize("seed", range(4))
def test_ilp_exact_against_dynamic_program_at_100_layers(seed):
    omega, params, bits = _wide_problem(seed, layers=100)
    target = (3.5, 4.0, 4.5, 5.0)[seed]
    sol = solve_bit_allocation(omega, params.astype(float), bits, target)
    assert sol["objective"] == pytest.approx(dp_bit_allocation(omega, params, bits, target), rel=1e-9)
    assert (params * np.asarray(sol["bits"])).sum() <= target * params.sum() + 1e-9


def test_allocation_noise_flags_decisions_within_the_standard_error():
    """A toy allocation (3 bits below a trace of 1, else 6): a layer at 0.99 +- 0.1 flips in P(Z > 0.1) = 46% of
    the draws; layers far from the threshold, or without noise, never do."""
    def solve(t):
        return [3 if x < 1.0 else 6 for x in t]

    traces, names = np.array([0.5, 0.99, 2.0]), ["a", "b", "c"]
    quiet = allocation_noise(solve, traces, np.zeros(3), solve(traces), names, 50, 0, "clamp")
    assert quiet["same_allocation"] == 1.0 and quiet["layers_changed"] == {}
    noisy = allocation_noise(solve, traces, np.array([0.01, 0.1, 0.01]), solve(traces), names, 400, 0, "clamp")
    assert set(noisy["layers_changed"]) == {"b"}
    assert abs(noisy["layers_changed"]["b"] - 0.46) < 5 * (0.46 * 0.54 / 400) ** 0.5
    assert noisy["same_allocation"] == pytest.approx(1 - noisy["layers_changed"]["b"])

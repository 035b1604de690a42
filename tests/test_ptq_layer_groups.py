"""Grouped Hutchinson probes (detr_ptq.ptq.layer_groups, mode ``grouped``) against exact Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from detr_ptq.ptq.hutchinson import HutchinsonConfig, hutchinson_traces, probe_groups, rademacher_like, traced_weights
from detr_ptq.ptq.layer_groups import cross_block_norms, graph_reach, group_layers

pytestmark = pytest.mark.usefixtures("one_thread")


class Towers(nn.Module):
    """Two small MLP towers on the same input: layers of different towers interact only through the loss's weak
    coupling term, so their cross blocks are small and grouping pairs them."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(6, 5), nn.Linear(5, 3)
        self.b1, self.b2 = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.a2(torch.tanh(self.a1(x))), self.b2(torch.tanh(self.b1(x)))


def _towers(num_batches: int = 2):
    """Least squares with zero residual at the traced weights (targets = the model's outputs), so the Hessian is
    ``2 sum J^T J``: every diagonal block is positive semi-definite."""
    torch.manual_seed(0)
    model = Towers()
    xs = [torch.randn(8, 6) for _ in range(num_batches)]
    with torch.no_grad():
        batches = [(x, *model(x)) for x in xs]
    names = ["a1", "a2", "b1", "b2"]
    layers = traced_weights(model, {n: getattr(model, n) for n in names})

    def loss_of(out_a, out_b, ya, yb):
        return (out_a - ya).pow(2).sum() + (out_b - yb).pow(2).sum() + 0.05 * (out_a - out_b - ya + yb).pow(2).sum()

    def loss_fn(batch):
        return loss_of(*model(batch[0]), *batch[1:])

    shapes = [layers[n][0].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def exact_hessian(batch) -> torch.Tensor:
        def f(flat):
            ws = {f"{n}.weight": t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
            return loss_of(*functional_call(model, ws, (batch[0],)), *batch[1:])
        return torch.autograd.functional.hessian(f, torch.cat([layers[n][0].detach().flatten() for n in names]))

    return batches, layers, loss_fn, exact_hessian, names, np.cumsum([0, *sizes])


def _blocks(h: torch.Tensor, off) -> list[list[torch.Tensor]]:
    return [[h[off[i]:off[i + 1], off[j]:off[j + 1]] for j in range(len(off) - 1)] for i in range(len(off) - 1)]


def test_grouped_mode_is_unbiased_and_nonnegative_on_psd_blocks():
    """Grouped mode pairs layers of different towers (their cross blocks are small), and per layer the
    estimate is within 3 standard errors of the exact trace of the mean calibration Hessian; every block is PSD
    here, and no estimate is negative by more than 3 standard errors."""
    batches, layers, loss_fn, exact_hessian, names, off = _towers()
    h = sum(exact_hessian(b) for b in batches) / len(batches)
    res = hutchinson_traces(loss_fn, batches, layers, HutchinsonConfig(max_probes=400, seed=1, mode="grouped"))
    assert res["mode"] == "grouped" and res["groups"]  # products are shared: the test covers cross terms
    assert all({g[0][0], g[1][0]} == {"a", "b"} for g in res["groups"] if len(g) == 2)
    for n, block in zip(names, (_blocks(h, off)[i][i] for i in range(len(names)))):
        exact, est = float(torch.diagonal(block).sum()), res["layers"][n]
        assert float(torch.linalg.eigvalsh(block).min()) > -1e-5 * exact  # PSD block
        assert abs(est["trace"] - exact) < 3 * est["stderr"], (n, est, exact)
        assert est["trace"] > -3 * est["stderr"] and est["stderr"] < 0.5 * exact


def test_group_samples_equal_the_exact_bilinear_forms():
    """Each grouped sample is exactly v_l . (H v_G)_l for its probes (re-drawn from the same seed, group by group),
    for singleton and shared groups, batched and not."""
    batches, layers, loss_fn, exact_hessian, names, off = _towers(num_batches=1)
    blocks = _blocks(exact_hessian(batches[0]), off)
    groups = [["b2", "a1"], ["a2"], ["b1"]]
    for probes in (1, 3):
        samples = probe_groups(loss_fn(batches[0]), layers, groups, torch.Generator().manual_seed(7), probes)
        gen = torch.Generator().manual_seed(7)
        for group in groups:
            v = {n: rademacher_like(layers[n], gen, probes)[0].reshape(probes, -1) for n in group}
            for n in group:
                i = names.index(n)
                expect = sum(torch.einsum("ki,ij,kj->k", v[n], blocks[i][names.index(m)], v[m]) for m in group)
                assert samples[n].tolist() == pytest.approx(expect.tolist(), rel=1e-4, abs=1e-6)


def test_cross_block_norms_and_graph_reach():
    """The pilot's F[l, m] is exactly the mean over its probes of ||(H v_m)_l||^2 (symmetrised) and var[l] is
    2 (F[l, l] - sum_i (v ⊙ H v)_i (w ⊙ H w)_i) for the two probes v, w; a layer nearer the loss is reached from
    fewer graph nodes (a cheaper double backward) than the layer below it."""
    batches, layers, loss_fn, exact_hessian, names, off = _towers(num_batches=1)
    blocks = _blocks(exact_hessian(batches[0]), off)
    probes = {n: rademacher_like(layers[n], torch.Generator().manual_seed(i), 2) for i, n in enumerate(names)}
    f, var = cross_block_norms(loss_fn(batches[0]), layers, probes)
    v = {n: probes[n][0].reshape(2, -1) for n in names}
    one = np.array([[float((v[m] @ blocks[i][j].T).pow(2).sum(1).mean()) for j, m in enumerate(names)]
                    for i in range(len(names))])
    assert f == pytest.approx((one + one.T) / 2, rel=1e-4)
    for i, n in enumerate(names):
        d = v[n] * (v[n] @ blocks[i][i].T)  # [2, n]: v ⊙ H v per probe
        assert var[i] == pytest.approx(2 * (one[i, i] - float(d[0] @ d[1])), rel=1e-4)
    reach, weight = graph_reach(loss_fn(batches[0]), layers)
    walk = reach @ weight
    for top, below in (("a2", "a1"), ("b2", "b1")):
        t, b = names.index(top), names.index(below)
        # the nodes above the top layer reach both; the lower layer is also reached through the top one's input
        assert (reach[t] & reach[b]).any() and walk[t] < walk[b]
    assert (reach[names.index("a1")] & reach[names.index("b1")]).any()  # both towers feed the same loss nodes
    # The cheap pilot: layer m's product asks only for layers whose walk is no longer, so each pair is measured
    # from its lower layer's probes (both, averaged, on a tie).
    cheap, cheap_var = cross_block_norms(loss_fn(batches[0]), layers, probes, walk)
    assert cheap_var == pytest.approx(var, rel=1e-5)
    for i in range(len(names)):
        for j in range(len(names)):
            lower = one[i, j] if walk[i] < walk[j] else one[j, i] if walk[j] < walk[i] else (one[i, j] + one[j, i]) / 2
            assert cheap[i, j] == pytest.approx(lower, rel=1e-4, abs=1e-9)


def test_group_layers_respects_the_inflation_bound():
    """Synthetic cross-block norms (var = 2 F[l, l]): a layer joins a group only while every member's inflation
    1 + sum_m F[l, m] / var[l] stays within the bound; a layer with a zero diagonal block joins only layers it
    has no cross block with; bound 1 merges only layers with no cross block at all."""
    f = np.array([[1.0, 0.2, 0.2, 0.9, 0.3],
                  [0.2, 1.0, 0.2, 0.0, 0.3],
                  [0.2, 0.2, 1.0, 0.0, 0.3],
                  [0.9, 0.0, 0.0, 1.0, 0.0],
                  [0.3, 0.3, 0.3, 0.0, 0.0]])
    reach = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=bool)
    weight = np.ones(4)  # graph nodes per layer: all share node 0
    assert group_layers(f, 2 * np.diag(f), reach, weight, 1.0) == [[0], [1], [2], [3, 4]]
    # inflation 1.2 each in [0, 1, 2]; 0 with 3 would be 1.45; 4 with 0, 1 or 2: infinite
    assert group_layers(f, 2 * np.diag(f), reach, weight, 1.25) == [[0, 1, 2], [3, 4]]
    groups = group_layers(f, 2 * np.diag(f), reach, weight, 2.0)
    assert groups == [[0, 1, 2, 3], [4]]
    for g in groups:
        for i in g:
            assert 1 + sum(f[i, m] for m in g if m != i) / (2 * f[i, i] if f[i, i] else 1) <= 2.0 + 1e-12

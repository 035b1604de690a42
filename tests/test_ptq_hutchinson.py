"""Hutchinson traces against the exact Hessian of a small conv + MLP model (torch.autograd.functional.hessian)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from detr_ptq.ptq.hutchinson import (
    HutchinsonConfig,
    hutchinson_traces,
    hutchpp_per_layer,
    probe_all_layers,
    probe_one_layer,
    probe_per_layer,
    rademacher_like,
    traced_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(12, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def _setup(num_batches: int = 2):
    torch.manual_seed(0)
    model = Small()
    batches = [(torch.randn(5, 2, 4, 4), torch.randn(5, 2)) for _ in range(num_batches)]
    layers = traced_weights(model, {"conv": model.conv, "fc1": model.fc1, "fc2": model.fc2})

    def loss_fn(batch):
        x, y = batch
        return (model(x) - y).pow(2).sum(1).mean() + 0.1 * model(x).pow(4).mean()

    names = list(layers)
    shapes = [layers[n][0].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def exact_hessian(batch) -> torch.Tensor:
        def f(flat):
            ws = dict(zip([f"{n}.weight" for n in names], [t.reshape(s) for t, s in zip(flat.split(sizes), shapes)]))
            x, y = batch
            out = functional_call(model, ws, (x,))
            return (out - y).pow(2).sum(1).mean() + 0.1 * out.pow(4).mean()
        flat = torch.cat([layers[n][0].detach().flatten() for n in names])
        return torch.autograd.functional.hessian(f, flat)

    return model, batches, layers, loss_fn, exact_hessian, names, sizes


def _block_traces(h: torch.Tensor, sizes: list[int]) -> list[float]:
    out, i = [], 0
    for s in sizes:
        out.append(float(torch.diagonal(h[i:i + s, i:i + s]).sum()))
        i += s
    return out


@pytest.mark.parametrize("mode,probes_per_batch,sigmas", [("hutch++", 2, 3), ("per-layer", 4, 3), ("all", 1, 4),
                                                          ("grouped", 4, 3)])
def test_traces_match_exact_hessian_within_standard_error(mode, probes_per_batch, sigmas):
    """Unbiased: per layer, the estimate is within 3 standard errors (per-layer probes; 4 for the all-layers
    probe, whose error distribution has heavier tails) of the exact trace of the mean calibration Hessian."""
    _, batches, layers, loss_fn, exact_hessian, names, sizes = _setup(num_batches=2)
    h = sum(exact_hessian(b) for b in batches) / len(batches)  # Hessian of the mean calibration loss
    exact = _block_traces(h, sizes)
    cfg = HutchinsonConfig(max_probes=400, seed=1, mode=mode, probes_per_batch=probes_per_batch)
    res = hutchinson_traces(loss_fn, batches, layers, cfg)
    per_layer = mode != "all"
    assert res["probes"] == (402 if mode == "hutch++" else 400)  # hutch++: whole steps of 3k = 6 products
    if mode == "grouped":  # the pilot's two products per layer, then one per probe and group
        assert res["hvps"] == 2 * len(names) + res["probes"] * (len(names) - sum(len(g) - 1 for g in res["groups"]))
    else:
        assert res["hvps"] == res["probes"] * (len(names) if per_layer else 1)
    for n, t in zip(names, exact):
        est = res["layers"][n]
        assert abs(est["trace"] - t) < sigmas * est["stderr"], (n, est, t)
        assert est["stderr"] < 0.5 * abs(t) + 1e-6  # the estimate is informative, not just wide
        assert est["avg_trace"] == pytest.approx(est["trace"] / est["params"])


def test_per_layer_probes_batched_equal_the_exact_quadratic_forms():
    """One gradient graph, K probes per layer in one batched double backward: each sample is exactly
    v^T H_ll v for its probe (the probes are re-drawn from the same seed in the same order)."""
    _, batches, layers, loss_fn, exact_hessian, names, sizes = _setup(num_batches=1)
    h = exact_hessian(batches[0])
    samples = probe_per_layer(loss_fn(batches[0]), layers, torch.Generator().manual_seed(7), probes=3)
    gen, i = torch.Generator().manual_seed(7), 0
    for n, s in zip(names, sizes):
        v = rademacher_like(layers[n], gen, 3)[0].reshape(3, -1)
        block = h[i:i + s, i:i + s]
        expect = torch.einsum("ki,ij,kj->k", v, block, v)
        assert samples[n].shape == (3,)
        assert samples[n].tolist() == pytest.approx(expect.tolist(), rel=1e-4, abs=1e-6)
        one = probe_per_layer(loss_fn(batches[0]), {n: layers[n]}, torch.Generator().manual_seed(0), probes=1)[n]
        v1 = rademacher_like(layers[n], torch.Generator().manual_seed(0))[0].flatten()
        assert float(one[0]) == pytest.approx(float(v1 @ block @ v1), rel=1e-4, abs=1e-6)  # unbatched path
        i += s


def test_one_probe_all_layers_decomposes_exactly():
    """Per layer, v_l . (Hv)_l from ONE product equals the exact-Hessian value for the same probe, and the
    per-layer estimates sum to the whole-model estimate v^T H v."""
    _, batches, layers, loss_fn, exact_hessian, names, sizes = _setup(num_batches=1)
    h = exact_hessian(batches[0])
    gen = torch.Generator().manual_seed(3)
    vec = {n: rademacher_like(layers[n], gen) for n in names}
    per_layer = probe_all_layers(loss_fn(batches[0]), layers, vec)
    v = torch.cat([vec[n][0].flatten() for n in names])
    hv = h @ v
    i = 0
    for n, s in zip(names, sizes):
        assert per_layer[n] == pytest.approx(float(v[i:i + s] @ hv[i:i + s]), rel=1e-4, abs=1e-6)
        i += s
    assert sum(per_layer.values()) == pytest.approx(float(v @ hv), rel=1e-4, abs=1e-6)
    # The per-layer (PyHessian) estimator sees only the diagonal block: v_l^T H_ll v_l.
    i = 0
    for n, s in zip(names, sizes):
        one = probe_one_layer(lambda: loss_fn(batches[0]), layers[n], vec[n])
        assert one == pytest.approx(float(v[i:i + s] @ h[i:i + s, i:i + s] @ v[i:i + s]), rel=1e-4, abs=1e-6)
        i += s


def test_tolerance_stops_early():
    _, batches, layers, loss_fn, *_ = _setup(num_batches=1)
    tol = hutchinson_traces(loss_fn, batches, layers, HutchinsonConfig(max_probes=5000, min_probes=10, tol=0.2))
    assert tol["stopped"] == "tol" and tol["probes"] < 5000 and tol["steps"] * 4 == tol["probes"]
    assert all(r["rel_stderr"] < 0.2 for r in tol["layers"].values())


def test_same_seed_same_estimate():
    _, batches, layers, loss_fn, *_ = _setup(num_batches=2)
    a = hutchinson_traces(loss_fn, batches, layers, HutchinsonConfig(max_probes=6, seed=5))
    b = hutchinson_traces(loss_fn, batches, layers, HutchinsonConfig(max_probes=6, seed=5))
    assert all(a["layers"][n]["trace"] == b["layers"][n]["trace"] for n in a["layers"])


def test_hutchpp_is_exact_when_the_sketch_spans_the_layer():
    """With k >= n_l the sketch Q spans the whole block, so Hutch++ returns Tr(H_ll) itself (no Monte Carlo)."""
    _, batches, layers, loss_fn, exact_hessian, names, sizes = _setup(num_batches=1)
    exact = dict(zip(names, _block_traces(exact_hessian(batches[0]), sizes)))
    fc2 = {"fc2": layers["fc2"]}  # 12 weights
    for seed in (0, 1):
        est = hutchpp_per_layer(loss_fn(batches[0]), fc2, torch.Generator().manual_seed(seed), k=12)
        assert est["fc2"] == pytest.approx(exact["fc2"], rel=1e-5)

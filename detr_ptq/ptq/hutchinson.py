"""Hutchinson estimation of per-layer Hessian traces, all layers from one Rademacher probe per step.

For a probe ``v`` (entries +-1) over the weights of ALL layers and the Hessian-vector product ``Hv``,
``v_l . (Hv)_l = v_l^T H_ll v_l + sum_{m != l} v_l^T H_lm v_m``; the cross terms have mean zero because the
blocks of ``v`` are independent, so ``E[v_l . (Hv)_l] = Tr(H_ll)`` for every layer at the cost of ONE
Hessian-vector product (two backward passes). The per-layer way of PyHessian spends one product per layer.

Each step draws a fresh probe and takes the next calibration micro-batch (cycling), so the running mean
estimates the trace of the Hessian of the mean loss over the calibration set; the standard error is the sample
standard deviation over steps / sqrt(steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gmpq.errors import UserError

LossFn = Callable[[object], Tensor]  # micro-batch -> scalar loss (a graph through the traced weights)


@dataclass
class HutchinsonConfig:
    max_probes: int = 50  # Hessian-vector products (one probe + one micro-batch each) at most
    min_probes: int = 10  # never stop on the tolerance before this many
    tol: float = 0.0  # stop when every layer's relative standard error < tol (0: run max_probes)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_probes < 1 or self.min_probes < 1:
            raise ValueError(f"max_probes={self.max_probes} and min_probes={self.min_probes} must be >= 1")
        if self.tol < 0:
            raise ValueError(f"tol={self.tol} must be >= 0 (0 = fixed number of probes)")


def rademacher_like(params: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """One +-1 probe per tensor, drawn on the CPU from ``gen`` (reproducible on any device)."""
    return [(torch.randint(0, 2, p.shape, generator=gen) * 2.0 - 1.0).to(p.device, p.dtype) for p in params]


def hessian_vector_product(loss: Tensor, params: Sequence[Tensor], vec: Sequence[Tensor]) -> list[Tensor]:
    """``H v`` for the Hessian of ``loss`` w.r.t. ``params`` (all together), by double backward.

    A parameter the loss does not depend on (or depends on only linearly) gets a zero block.
    """
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if not live:
        return out
    hv = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[vec[i] for i in live],
                             allow_unused=True)
    return [h if h is not None else z for h, z in zip(hv, out)]


def probe_all_layers(loss: Tensor, layers: dict[str, list[Tensor]], vec: dict[str, list[Tensor]]) -> dict[str, float]:
    """``{layer: v_l . (Hv)_l}`` from ONE Hessian-vector product over every layer's tensors."""
    names = list(layers)
    flat_p = [p for n in names for p in layers[n]]
    flat_v = [u for n in names for u in vec[n]]
    hv = hessian_vector_product(loss, flat_p, flat_v)
    out, i = {}, 0
    for n in names:
        k = len(layers[n])
        out[n] = float(sum((u * h).sum() for u, h in zip(flat_v[i:i + k], hv[i:i + k])))
        i += k
    return out


def probe_one_layer(loss_fn: Callable[[], Tensor], params: list[Tensor], vec: list[Tensor]) -> float:
    """``v_l^T H_ll v_l`` for one layer alone (the PyHessian way: its own forward and double backward)."""
    hv = hessian_vector_product(loss_fn(), params, vec)
    return float(sum((u * h).sum() for u, h in zip(vec, hv)))


class RunningStats:
    """Per-layer running mean and variance (Welford), for the trace estimate and its standard error."""

    def __init__(self, names: Sequence[str]) -> None:
        self.n = 0
        self.mean = dict.fromkeys(names, 0.0)
        self.m2 = dict.fromkeys(names, 0.0)

    def add(self, sample: dict[str, float]) -> None:
        self.n += 1
        for k, x in sample.items():
            d = x - self.mean[k]
            self.mean[k] += d / self.n
            self.m2[k] += d * (x - self.mean[k])

    def stderr(self, k: str) -> float:
        return math.sqrt(self.m2[k] / (self.n - 1) / self.n) if self.n > 1 else math.inf

    def rel_stderr(self, k: str) -> float:
        m = abs(self.mean[k])
        return self.stderr(k) / m if m > 0 else math.inf


def hutchinson_traces(loss_fn: LossFn, batches: Sequence, layers: dict[str, list[Tensor]], cfg: HutchinsonConfig,
                      mode: str = "all", progress: Callable[[int, RunningStats], None] | None = None) -> dict:
    """Estimate ``Tr(H_ll)`` for every layer ``l``.

    ``loss_fn(batch)`` returns a scalar loss whose graph reaches the tensors in ``layers`` (``{name: [weight]}``,
    each requiring grad). ``mode="all"``: one Hessian-vector product per step for all layers; ``"per-layer"``:
    one per layer per step (PyHessian's way, for comparison and benchmarks).

    Returns ``{"layers": {name: {"trace", "avg_trace", "stderr", "rel_stderr", "params"}}, "probes": steps,
    "hvps": Hessian-vector products spent, "seconds", "stopped": "max_probes" | "tol"}``.
    """
    if mode not in ("all", "per-layer"):
        raise UserError(f"Hutchinson mode {mode!r} is unknown; accepted: ['all', 'per-layer']")
    if not batches:
        raise UserError("Hutchinson estimation needs at least one calibration micro-batch; got none")
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = RunningStats(list(layers))
    t0, hvps, stopped = time.perf_counter(), 0, "max_probes"
    for step in range(cfg.max_probes):
        batch = batches[step % len(batches)]
        vec = {n: rademacher_like(ps, gen) for n, ps in layers.items()}
        if mode == "all":
            sample = probe_all_layers(loss_fn(batch), layers, vec)
            hvps += 1
        else:
            sample = {n: probe_one_layer(lambda b=batch: loss_fn(b), layers[n], vec[n]) for n in layers}
            hvps += len(layers)
        stats.add(sample)
        if progress is not None:
            progress(step, stats)
        if cfg.tol > 0 and stats.n >= cfg.min_probes and all(stats.rel_stderr(n) < cfg.tol for n in layers):
            stopped = "tol"
            break
    result = {}
    for n, ps in layers.items():
        count = sum(p.numel() for p in ps)
        result[n] = {"trace": stats.mean[n], "avg_trace": stats.mean[n] / count, "stderr": _json(stats.stderr(n)),
                     "rel_stderr": _json(stats.rel_stderr(n)), "params": count}
    return {"layers": result, "probes": stats.n, "hvps": hvps, "seconds": time.perf_counter() - t0,
            "stopped": stopped, "mode": mode}


def _json(x: float) -> float | None:
    """inf (one probe: no spread yet; zero mean: no relative error) is written as null, which JSON can hold."""
    return x if math.isfinite(x) else None


def traced_weights(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[Tensor]]:
    """``{name: [weight tensors]}`` of each layer (``quantized_weights()`` when defined, else ``[weight]``),
    with ``requires_grad`` switched on for them and off for every other parameter of ``model`` (frozen layers
    such as the backbone stem are traced too; the rest of the graph is not differentiated)."""
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for name, layer in layers.items():
        ws = list(layer.quantized_weights()) if hasattr(layer, "quantized_weights") else [layer.weight]
        for w in ws:
            w.requires_grad_(True)
        out[name] = ws
    return out

"""Hutchinson estimation of per-layer Hessian traces ``Tr(H_ll)`` with standard errors.

Estimators (``HutchinsonConfig.mode``; the default ``auto`` is ``gauss-newton`` where the loss is given as per-row
terms of the outputs, i.e. the ``output-*`` sensitivities, and ``per-layer`` elsewhere):

- ``hutch++``: Hutch++ (Meyer, Musco, Musco & Woodruff, 2021) on each layer's block ``H_ll``, from the
  same single gradient graph per micro-batch: with ``k = probes_per_batch``, ``Q = orth(H_ll S)`` for a
  Rademacher ``S`` (k columns), then ``Tr(Q^T H_ll Q)`` (k more products) plus Hutchinson on the rest,
  ``Tr((I - QQ^T) H_ll (I - QQ^T))``, with k fresh probes projected off ``Q``. Unbiased for any ``Q`` (the
  second part is an unbiased estimate of ``Tr(H_ll) - Tr(Q^T H_ll Q)``), never negative for a positive
  semi-definite block, and exact when ``k >= n_l``. Per-layer Hessians of trained networks are dominated by a few
  directions, so the low-rank part can take most of the trace: on ResNet-20 the variance drops by orders of
  magnitude; on the reference DETR (k = 4) it is no better than ``per-layer`` (benchmarks/bench_hessian.py).
  3k products per layer and step, in three batched double backwards.
- ``per-layer`` (``auto`` for losses without a row form; of the estimators that take only a scalar loss, the
  fastest at equal standard error measured on the reference DETR): a Rademacher probe
  ``v_l`` on ONE layer's weights at a time, ``v_l^T H_ll v_l``, whose mean is ``Tr(H_ll)`` and which has no
  cross-layer terms, so its variance is PyHessian's per-layer variance and a positive semi-definite block never
  gets a negative sample. Cost is cut two ways, without changing what is estimated: the gradient graph (forward
  + first backward with ``create_graph``) is built ONCE per micro-batch and reused by every layer and probe; and
  the ``probes_per_batch`` probes of a layer go through one batched double backward
  (``torch.autograd.grad(..., is_grads_batched=True)``, vmap over the probes). The second backward of
  ``g_l . v_l`` only walks the part of the graph between layer ``l`` and the loss.
- ``grouped``: ``per-layer``, except that layers whose cross-blocks ``H_lm`` are small share one double
  backward, each with its own independent Rademacher probe, so ``v_l . (H v_G)_l`` still has mean ``Tr(H_ll)``
  (the cross terms ``v_l^T H_lm v_m`` have mean 0); only its variance grows, by the factor
  ``1 + sum_m ||H_lm||_F^2 / Var_l`` <= ``group_inflation`` as measured by a pilot on the first micro-batch (two
  probes per layer, each product walking down to its layer only: about one per-layer step), while one product
  serves the group; ``detr_ptq.ptq.layer_groups`` forms the groups (deterministic: same seed, same groups). With
  fewer than 3 steps the pilot would not pay for itself and every layer is its own group. Measured
  (benchmarks/bench_hessian.py), it does NOT pay on the reference DETR: its cross blocks are large next to the
  diagonal blocks' variances and the realised inflation exceeds the pilot's, so at equal standard error it is
  slower than ``per-layer`` (hence not the default).
- ``gauss-newton``: for a loss written as per-row terms of the outputs (``RowLoss``: the ``output-*``
  sensitivities, a classifier's cross-entropy), ``Tr(H_ll)`` = the Gauss-Newton part ``Tr(J_l^T H_phi J_l)``,
  probed in output space for EVERY layer by one batched first-order backward of ``probes_per_batch`` probes, plus
  the residual part, probed per layer with ``residual_probes`` probes on steps 0, 1 and every ``residual_every``-th
  (its variance is small next to the Gauss-Newton part's; skipped where the loss's gradient in the
  outputs is exactly 0, as at student == teacher). Exact decomposition, unbiased; see
  ``detr_ptq.ptq.gauss_newton``.
- ``all``: one probe over ALL layers and one Hessian-vector product per step; ``v_l . (Hv)_l`` has mean
  ``Tr(H_ll)`` but carries the cross terms ``v_l^T H_lm v_m`` (mean 0, large variance: a small layer's estimate
  can come out negative for a PSD block). Kept for comparison (benchmarks/bench_hessian.py).

Each step takes the next calibration micro-batch (cycling) and ``probes_per_batch`` fresh probes per layer; the
estimate is the mean over steps of the per-step probe means, so it estimates the trace of the Hessian of the
mean calibration loss. The standard error is the sample standard deviation of the per-step means / sqrt(steps)
(it includes the batch-to-batch spread, so it is conservative when every batch is visited equally often).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detr_ptq.ptq.gauss_newton import RowLoss, output_factors, probe_gauss_newton, residual_loss
from detr_ptq.ptq.layer_groups import cross_block_norms, graph_reach, group_layers
from gmpq.errors import UserError

LossFn = Callable[[object], Tensor]  # micro-batch -> scalar loss (a graph through the traced weights)
RowsFn = Callable[[object], RowLoss]  # micro-batch -> the same loss as per-row terms of the outputs
MODES = ("auto", "per-layer", "grouped", "hutch++", "gauss-newton", "all")
PILOT_PROBES = 2  # grouped mode: probes per layer in the pilot (two give the per-layer variance, see layer_groups)
PILOT_MIN_STEPS = 3  # grouped mode: fewer steps than this and the pilot (about one step) is not worth it


@dataclass
class HutchinsonConfig:
    max_probes: int = 50  # Hessian-vector products per layer at most (all mode: products, each for all layers)
    min_probes: int = 10  # never stop on the tolerance before this many
    tol: float = 0.0  # stop when every layer's relative standard error < tol (0: run max_probes)
    seed: int = 0
    mode: str = "auto"  # auto | per-layer | grouped | hutch++ | gauss-newton | all (see the module docstring)
    probes_per_batch: int = 4  # per layer and micro-batch: probes batched in one double backward (hutch++: k;
    # gauss-newton: output-space probes, one batched first-order backward for all layers)
    residual_probes: int = 1  # gauss-newton: per-layer probes of the residual part on the steps that probe it
    residual_every: int = 4  # gauss-newton: the residual part is probed on steps 0, 1 and every residual_every-th
    group_inflation: float = 2.0  # grouped: largest variance inflation a layer may take from its group

    def __post_init__(self) -> None:
        if min(self.max_probes, self.min_probes, self.probes_per_batch, self.residual_probes,
               self.residual_every) < 1:
            raise ValueError(f"max_probes={self.max_probes}, min_probes={self.min_probes}, probes_per_batch="
                             f"{self.probes_per_batch}, residual_probes={self.residual_probes} and residual_every="
                             f"{self.residual_every} must be >= 1")
        if self.tol < 0:
            raise ValueError(f"tol={self.tol} must be >= 0 (0 = fixed number of probes)")
        if not self.group_inflation >= 1:
            raise ValueError(f"group_inflation={self.group_inflation} must be >= 1 (1: only layers without cross "
                             f"terms share a product; per-layer mode: none)")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; accepted: {list(MODES)}")


def rademacher_like(params: Sequence[Tensor], gen: torch.Generator, batch: int = 0) -> list[Tensor]:
    """One +-1 probe per tensor (``[batch, *shape]`` when ``batch`` > 0), drawn on the CPU from ``gen`` (so the
    same seed gives the same probes on any device)."""
    lead = (batch,) if batch else ()
    # int8 draws: an eighth of int64's memory traffic (drawing a large layer's probes costs about as much as an
    # elementwise op over it, not negligible next to its product)
    return [(torch.randint(0, 2, lead + tuple(p.shape), generator=gen, dtype=torch.int8).to(p.device, p.dtype) * 2 - 1)
            for p in params]


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
    """``v_l^T H_ll v_l`` for one layer alone, with its own forward and double backward (the plain per-layer loop:
    the reference that benchmarks/bench_hessian.py compares with)."""
    hv = hessian_vector_product(loss_fn(), params, vec)
    return float(sum((u * h).sum() for u, h in zip(vec, hv)))


def _layer_grads(loss: Tensor, layers: dict[str, list[Tensor]]):
    """``(name, params, grads)`` per layer, the gradients from ONE backward with ``create_graph`` (the graph every
    probe of every layer reuses)."""
    flat = [p for ps in layers.values() for p in ps]
    grads = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)
    i = 0
    for n, ps in layers.items():
        yield n, ps, grads[i:i + len(ps)]
        i += len(ps)


def probe_per_layer(loss: Tensor, layers: dict[str, list[Tensor]], gen: torch.Generator, probes: int = 1
                    ) -> dict[str, Tensor]:
    """``{layer: [probes] samples v_l^T H_ll v_l}``, every layer probed on its own, from ONE gradient graph.

    ``probes`` > 1 batches a layer's probes in one double backward (``is_grads_batched``). A layer the loss does
    not reach, or reaches only linearly, gets exact zeros.
    """
    return probe_groups(loss, layers, [[n] for n in layers], gen, probes)


def probe_groups(loss: Tensor, layers: dict[str, list[Tensor]], groups: Sequence[Sequence[str]],
                 gen: torch.Generator, probes: int = 1, times: dict[str, float] | None = None) -> dict[str, Tensor]:
    """``{layer: [probes] samples v_l . (H v_G)_l}``: ONE gradient graph, then per group ``G`` one (batched)
    double backward with an independent Rademacher probe on each of its layers. Mean ``Tr(H_ll)``; the cross
    terms of the group add variance (see ``detr_ptq.ptq.layer_groups``). Singleton groups: ``probe_per_layer``.
    Probes are drawn group by group, layer by layer in group order. ``times``, when given, receives CPU seconds:
    ``"first_backward"`` and, per group, ``"hvp:<first layer>"`` (its probes and batched double backward).
    """
    clock = time.process_time()
    grads = {n: gs for n, _, gs in _layer_grads(loss, layers)}
    if times is not None:
        times["first_backward"] = time.process_time() - clock
    out = {}
    for group in groups:
        clock = time.process_time()
        vs = {n: rademacher_like(layers[n], gen, probes) for n in group}
        live = [(n, k) for n in group for k, g in enumerate(grads[n]) if g is not None and g.requires_grad]
        for n in group:
            out[n] = torch.zeros(probes, dtype=torch.float64)
        if not live:
            continue
        gouts = [vs[n][k] if probes > 1 else vs[n][k][0] for n, k in live]
        hv = torch.autograd.grad([grads[n][k] for n, k in live], [layers[n][k] for n, k in live], grad_outputs=gouts,
                                 retain_graph=True, allow_unused=True, is_grads_batched=probes > 1)
        for (n, k), h in zip(live, hv):
            if h is not None:
                out[n] += (vs[n][k] * h.reshape(vs[n][k].shape)).flatten(1).sum(1).double().cpu()
        if times is not None:
            times[f"hvp:{group[0]}"] = time.process_time() - clock
    return out


def gauss_newton_step(loss: RowLoss, layers: dict[str, list[Tensor]], gen: torch.Generator, probes: int,
                      residual_probes: int) -> tuple[dict[str, float], dict[str, float] | None]:
    """-> (``{layer: Gauss-Newton part}``: the mean of ``probes`` output-space samples, ``{layer: residual part}``:
    the mean of ``residual_probes`` per-layer samples, or None where it is exactly 0 or ``residual_probes`` is 0)."""
    a_pos, a_neg, g = output_factors(loss)
    gn = {n: float(s.mean()) for n, s in probe_gauss_newton(loss.rows, layers, (a_pos, a_neg), gen, probes).items()}
    r = residual_loss(loss, g) if residual_probes else None
    if r is None:
        return gn, None
    return gn, {n: float(s.mean()) for n, s in probe_per_layer(r, layers, gen, residual_probes).items()}


def hutchpp_per_layer(loss: Tensor, layers: dict[str, list[Tensor]], gen: torch.Generator, k: int = 4
                      ) -> dict[str, float]:
    """``{layer: Hutch++ estimate of Tr(H_ll)}`` for every layer, from ONE gradient graph (3k Hessian-vector
    products per layer, in three batched double backwards). See the module docstring."""
    out = {}
    for n, ps, gs in _layer_grads(loss, layers):
        live = [j for j, g in enumerate(gs) if g is not None and g.requires_grad]
        if not live:
            out[n] = 0.0
            continue
        out[n] = _hutchpp_block([gs[j] for j in live], [ps[j] for j in live], gen, k)
    return out


def _hutchpp_block(grads: list[Tensor], params: list[Tensor], gen: torch.Generator, k: int) -> float:
    """Hutch++ on the Hessian block of ``params`` (``grads``: their first derivatives, with a graph)."""
    sizes = [p.numel() for p in params]

    def hvp(m: Tensor) -> Tensor:  # [r, N] -> H m [r, N]
        gouts = [c.reshape(m.shape[0], *p.shape) for c, p in zip(m.split(sizes, 1), params)]
        hv = torch.autograd.grad(grads, params, grad_outputs=gouts, retain_graph=True, is_grads_batched=True,
                                 allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(g)).reshape(m.shape[0], -1)
                          for h, g in zip(hv, gouts)], 1)

    def probes() -> Tensor:
        return torch.cat([v.reshape(k, -1) for v in rademacher_like(params, gen, k)], 1)

    dtype = params[0].dtype
    q = torch.linalg.qr(hvp(probes()).T.double()).Q.T.to(dtype)  # [min(k, N), N], orthonormal rows
    low_rank = float((q * hvp(q)).sum())
    g = probes()
    g = g - (g @ q.T) @ q  # (I - QQ^T) g: E[g g^T] = I - QQ^T
    rest = float((g * hvp(g)).sum(1).mean()) if q.shape[0] < g.shape[1] else 0.0
    return low_rank + rest


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

    def trace(self, k: str) -> float:
        return self.mean[k]

    def stderr(self, k: str) -> float:
        return math.sqrt(self.m2[k] / (self.n - 1) / self.n) if self.n > 1 else math.inf

    def rel_stderr(self, k: str) -> float:
        m = abs(self.trace(k))
        return self.stderr(k) / m if m > 0 else math.inf


class SplitStats(RunningStats):
    """Gauss-Newton mode: the per-step Gauss-Newton samples (this object's own statistics) plus the residual part's
    (``residual``, probed on fewer steps), estimated from independent probes: the trace is the sum of the two means,
    its standard error the root of the two squared standard errors. A residual part never probed (exactly 0) adds
    nothing."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(names)
        self.residual = RunningStats(names)

    def trace(self, k: str) -> float:
        return self.mean[k] + self.residual.mean[k]

    def stderr(self, k: str) -> float:
        se = super().stderr(k)
        return math.hypot(se, self.residual.stderr(k)) if self.residual.n else se


def hutchinson_traces(loss_fn: LossFn, batches: Sequence, layers: dict[str, list[Tensor]], cfg: HutchinsonConfig,
                      mode: str | None = None, progress: Callable[[int, RunningStats], None] | None = None,
                      rows_fn: RowsFn | None = None) -> dict:
    """Estimate ``Tr(H_ll)`` for every layer ``l``.

    ``loss_fn(batch)`` returns a scalar loss whose graph reaches the tensors in ``layers`` (``{name: [weight]}``,
    each requiring grad). ``mode`` overrides ``cfg.mode`` (see the module docstring). ``rows_fn(batch)``: the same
    loss as a ``RowLoss`` (required by mode ``gauss-newton``).

    Returns ``{"layers": {name: {"trace", "avg_trace", "stderr", "rel_stderr", "params"}}, "probes": probes per
    layer, "steps": micro-batches used, "hvps": Hessian-vector products (per-layer mode: one per probe and layer;
    grouped: one per probe and group, plus the pilot's two per layer), "seconds", "stopped": "max_probes" | "tol",
    "mode"}`` and in grouped mode ``"groups"`` (the groups of more than one layer). ``stderr`` is null after a
    single step.
    """
    mode = mode or cfg.mode
    if mode not in MODES:
        raise UserError(f"Hutchinson mode {mode!r} is unknown; accepted: {list(MODES)}")
    if not batches:
        raise UserError("Hutchinson estimation needs at least one calibration micro-batch; got none")
    if mode == "auto":
        mode = "gauss-newton" if rows_fn is not None else "per-layer"
    if mode == "gauss-newton" and rows_fn is None:
        raise UserError(f"Hutchinson mode 'gauss-newton' needs the loss as per-row terms of the outputs, which this "
                        f"loss does not provide (the output-* sensitivities do; the 'loss' metric does not); accepted "
                        f"modes here: {[m for m in MODES if m != 'gauss-newton']}")
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = SplitStats(list(layers)) if mode == "gauss-newton" else RunningStats(list(layers))
    per_step = {"all": 1, "hutch++": 3 * cfg.probes_per_batch}.get(mode, min(cfg.probes_per_batch, cfg.max_probes))
    steps = max(math.ceil(cfg.max_probes / per_step), 1)  # per_step: products per layer and step
    t0, hvps, stopped = time.perf_counter(), 0, "max_probes"
    groups = [[n] for n in layers]
    if mode == "grouped" and steps >= PILOT_MIN_STEPS and len(layers) > 1:
        groups = pilot_groups(loss_fn(batches[0]), loss_fn(batches[0]), layers, gen, cfg.group_inflation)
        hvps += PILOT_PROBES * len(layers)
    for step in range(steps):
        batch = batches[step % len(batches)]
        if mode == "all":
            vec = {n: rademacher_like(ps, gen) for n, ps in layers.items()}
            sample = probe_all_layers(loss_fn(batch), layers, vec)
            hvps += 1
        elif mode == "hutch++":
            sample = hutchpp_per_layer(loss_fn(batch), layers, gen, cfg.probes_per_batch)
            hvps += per_step * len(layers)
        elif mode == "gauss-newton":
            probe_res = step < 2 or step % cfg.residual_every == 0
            sample, res = gauss_newton_step(rows_fn(batch), layers, gen, per_step, cfg.residual_probes * probe_res)
            if res is not None:
                stats.residual.add(res)
                hvps += cfg.residual_probes * len(layers)
        else:
            sample = {n: float(s.mean()) for n, s in probe_groups(loss_fn(batch), layers, groups, gen,
                                                                   per_step).items()}
            hvps += per_step * len(groups)
        stats.add(sample)
        if progress is not None:
            progress(step, stats)
        if (cfg.tol > 0 and stats.n * per_step >= cfg.min_probes and stats.n > 1
                and all(stats.rel_stderr(n) < cfg.tol for n in layers)):
            stopped = "tol"
            break
    result = {}
    for n, ps in layers.items():
        count = sum(p.numel() for p in ps)
        trace = stats.trace(n)
        result[n] = {"trace": trace, "avg_trace": trace / count, "stderr": _json(stats.stderr(n)),
                     "rel_stderr": _json(stats.rel_stderr(n)), "params": count}
    return {"layers": result, "probes": stats.n * per_step, "steps": stats.n, "hvps": hvps,
            "seconds": time.perf_counter() - t0, "stopped": stopped, "mode": mode,
            **({"groups": [g for g in groups if len(g) > 1]} if mode == "grouped" else {})}


def pilot_groups(loss: Tensor, loss_again: Tensor, layers: dict[str, list[Tensor]], gen: torch.Generator,
                 max_inflation: float) -> list[list[str]]:
    """Groups for ``probe_groups``: graph costs from ``loss_again``, then cross-block norms from one probe per
    layer on ``loss`` (two graphs of the same loss), see ``detr_ptq.ptq.layer_groups``."""
    names = list(layers)
    reach, weight = graph_reach(loss_again, layers)
    probes = {n: rademacher_like(ps, gen, PILOT_PROBES) for n, ps in layers.items()}
    f, var = cross_block_norms(loss, layers, probes, reach @ weight)
    return [[names[i] for i in g] for g in group_layers(f, var, reach, weight, max_inflation)]


def _json(x: float) -> float | None:
    """inf (one step: no spread yet; zero mean: no relative error) is written as null, which JSON can hold."""
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

"""``allocate(model, traces, cfg) -> policy``: Omega table from Hessian traces, ILP, policy in the shared format.

    Omega_l(b) = T_l * || Q_b(W_l) - W_ref,l ||^2

``Q_b`` is Eq. 6 (``gmpq.quant.functional.symmetric_fake_quant``, per tensor); ``W_ref = W_q8`` for the
``output-quant`` metric, the float weights otherwise. ``T_l`` is, with ``omega_trace: average`` (default), the
average trace ``Tr(H_ll) / n_l``: then ``Omega / 2`` is the second-order estimate of the loss change,
``1/2 dW^T H dW ~ 1/2 (Tr(H)/n) ||dW||^2`` for a quantization error spread evenly over the layer (HAWQ-v2/v3);
``omega_trace: total`` uses ``Tr(H_ll)`` itself.

Trace hygiene (Hutchinson estimates are noisy and the ``loss`` Hessian is indefinite):
- NaN or inf traces raise ``UserError`` naming every such layer (re-run ``sensitivity`` with more probes);
- negative traces are clamped to 0 with a warning (``negative_traces: clamp``, default) or replaced by their
  magnitude (``negative_traces: abs``); their count and names are stored in the policy summary. The ``loss``
  Hessian is indefinite; the ``output-*`` ones are (nearly) positive semi-definite since their box term is
  twice differentiable (``detr_ptq.ptq.distill``), so a negative estimate there is noise.

Noise: each trace comes with its standard error. ``allocation_noise`` re-solves the ILP ``noise_draws`` times with
traces drawn from ``N(trace, stderr^2)`` and stores in ``summary.noise`` how often the allocation (and each
layer's bits) stays the same; when fewer than half of the draws give the same allocation, a warning says the
deciding differences are within the noise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

import detr_ptq.models.qattention  # noqa: F401  (registers the attention with gmpq.quant)
from detr_ptq.ptq.ilp import solve_bit_allocation
from detr_ptq.ptq.sensitivity import DEFAULT_EXCLUDE, is_excluded
from gmpq.errors import UserError
from gmpq.quant.cost import cost_summary, measure_macs
from gmpq.quant.functional import FULL_PRECISION, symmetric_fake_quant
from gmpq.quant.modules import quantizable_layers
from gmpq.quant.policy import make_policy


@dataclass
class AllocateConfig:
    metric: Literal["loss", "output-float", "output-quant"] = "output-quant"
    target_bits: float = 4.0  # average weight bits over the allocated layers, weighted by parameter count
    candidate_bits: list[int] = field(default_factory=list)  # [] = 3..6 for targets <= 5, 4..7 above (paper)
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))  # kept full precision, not counted
    omega_trace: Literal["average", "total"] = "average"
    negative_traces: Literal["clamp", "abs"] = "clamp"  # clamp: to 0 (insensitive); abs: use |trace|
    ref_bits: int = 8  # W_ref = W_q8 for output-quant
    max_size_mb: float = 0.0  # whole model (float parts at 32 bits), 1e6 bytes; 0 = no budget
    max_gbops: float = 0.0  # per image at input_size; 0 = no budget
    input_size: list[int] = field(default_factory=lambda: [3, 96, 96])  # for MACs/BOPs (C, H, W)
    noise_draws: int = 20  # re-solve with traces drawn from N(trace, stderr^2) this often (0 = off)
    noise_seed: int = 0

    def __post_init__(self) -> None:
        bad = [b for b in self.candidate_bits if b not in range(2, 9)]
        if bad:
            raise ValueError(f"candidate_bits={self.candidate_bits}: {bad} not in 2..8")
        if self.noise_draws < 0:
            raise ValueError(f"noise_draws={self.noise_draws} must be >= 0")


def default_candidates(target: float) -> list[int]:
    """The paper's candidates: 3-6 bits for targets 4 and 5, 4-7 for target 6."""
    return [4, 5, 6, 7] if target > 5 else [3, 4, 5, 6]


def clean_traces(traces: dict[str, float], names: list[str], rule: str = "clamp") -> tuple[np.ndarray, list[str]]:
    """-> (traces [L] finite and >= 0, names of the layers whose estimate was negative). NaN/inf -> ``UserError``.
    ``rule``: ``clamp`` sets negative traces to 0, ``abs`` uses their magnitude."""
    missing = [n for n in names if n not in traces]
    if missing:
        raise UserError(f"the sensitivity file has no trace for layer(s) {missing}; re-run `detr-ptq sensitivity` "
                        f"on this model")
    t = np.asarray([traces[n] for n in names], dtype=np.float64)
    bad = [n for n, v in zip(names, t) if not np.isfinite(v)]
    if bad:
        raise UserError(f"non-finite Hessian trace (NaN or inf) for layer(s) {bad}; re-run `detr-ptq sensitivity` "
                        f"(more probes, a smaller calibration batch) or check the checkpoint for NaN weights")
    negative = [n for n, v in zip(names, t) if v < 0]
    if negative:
        shown = negative[:8] + ([f"... {len(negative) - 8} more"] if len(negative) > 8 else [])
        what = "clamped to 0 (treated as insensitive" if rule == "clamp" else "replaced by their magnitude ("
        warnings.warn(f"{len(negative)} of {len(names)} layer(s) have a negative trace estimate; {what}; all names "
                      f"are in the policy summary): {shown}", stacklevel=2)
    return (np.abs(t) if rule == "abs" else np.clip(t, 0, None)), negative


def weight_tensors(layer: nn.Module) -> list[torch.Tensor]:
    return list(layer.quantized_weights()) if hasattr(layer, "quantized_weights") else [layer.weight]


@torch.no_grad()
def omega_table(layers: dict[str, nn.Module], traces: np.ndarray, bits: list[int], ref_bits: int | None
                ) -> np.ndarray:
    """[L, B]: ``traces[l] * ||Q_b(W_l) - W_ref,l||^2`` (``ref_bits=None``: W_ref = float weights)."""
    out = np.zeros((len(layers), len(bits)))
    for i, layer in enumerate(layers.values()):
        for w in weight_tensors(layer):
            w = w.detach().float()
            ref = w if ref_bits is None else symmetric_fake_quant(w, ref_bits, per_channel=False)
            for j, b in enumerate(bits):
                out[i, j] += float((symmetric_fake_quant(w, b, per_channel=False) - ref).pow(2).sum())
    return out * traces[:, None]


def allocation_noise(solve, traces: np.ndarray, stderr: np.ndarray, chosen: list[int], names: list[str],
                     draws: int, seed: int, rule: str) -> dict:
    """How much of the allocation the trace noise decides: re-solve ``draws`` times with traces drawn from
    ``N(trace, stderr^2)`` (independently per layer, then the same negative-trace ``rule``) and compare.

    ``solve(traces [L]) -> bits [L]``. Returns ``{"draws", "same_allocation": share of draws that give the same
    bits everywhere, "layers_changed": {layer: share of draws where its bits differ} (layers that never change
    are left out), "mean_changed_layers"}``.
    """
    rng = np.random.default_rng(seed)
    changed = np.zeros(len(names))
    same = 0
    for _ in range(draws):
        t = traces + stderr * rng.standard_normal(len(traces))
        t = np.abs(t) if rule == "abs" else np.clip(t, 0, None)
        diff = np.asarray(solve(t)) != np.asarray(chosen)
        changed += diff
        same += not diff.any()
    return {"draws": draws, "same_allocation": same / draws if draws else None,
            "layers_changed": {n: c / draws for n, c in zip(names, changed) if c > 0},
            "mean_changed_layers": float(changed.sum() / draws) if draws else None}


def allocate(model: nn.Module, sens: dict, cfg: AllocateConfig, model_name: str) -> dict:
    """Stage: (float model, sensitivity result, cfg) -> policy dict covering every quantizable layer."""
    if cfg.metric not in sens.get("metrics", {}):
        raise UserError(f"the sensitivity file has no metric {cfg.metric!r}; it has {sorted(sens.get('metrics', {}))}")
    result = sens["metrics"][cfg.metric]
    qlayers = quantizable_layers(model)
    alloc = {n: m for n, m in qlayers.items() if not is_excluded(n, cfg.exclude)}
    if not alloc:
        raise UserError(f"exclude={cfg.exclude} leaves no layer to allocate")
    key = "avg_trace" if cfg.omega_trace == "average" else "trace"
    traces, clamped = clean_traces({n: r[key] for n, r in result["layers"].items()}, list(alloc), cfg.negative_traces)
    bits = sorted(cfg.candidate_bits) or default_candidates(cfg.target_bits)
    ref_bits = cfg.ref_bits if cfg.metric == "output-quant" else None
    err = omega_table(alloc, np.ones(len(alloc)), bits, ref_bits)  # ||Q_b(W_l) - W_ref,l||^2
    omega = err * traces[:, None]
    params = np.asarray([sum(w.numel() for w in weight_tensors(m)) for m in alloc.values()], dtype=np.float64)

    fixed_params = sum(p.numel() for p in model.parameters()) - params.sum()
    macs = measure_macs(model, tuple(cfg.input_size)) if (cfg.max_gbops > 0) else None
    bops_per_bit = np.asarray([macs[n] * FULL_PRECISION for n in alloc], dtype=np.float64) if macs else None
    fixed_bops = (sum(macs[n] for n in qlayers if n not in alloc) * FULL_PRECISION**2) if macs else 0.0

    def solve(t: np.ndarray) -> dict:
        return solve_bit_allocation(
            err * t[:, None], params, bits, cfg.target_bits,
            max_size_bits=cfg.max_size_mb * 8e6 if cfg.max_size_mb > 0 else None, fixed_size_bits=fixed_params * 32,
            bops_per_bit=bops_per_bit, max_bops=cfg.max_gbops * 1e9 if cfg.max_gbops > 0 else None,
            fixed_bops=fixed_bops)

    sol = solve(traces)
    stderr = np.asarray([(result["layers"][n].get("stderr") or 0.0) for n in alloc], dtype=np.float64)
    if key == "avg_trace":
        stderr = stderr / params
    raw = np.asarray([result["layers"][n][key] for n in alloc], dtype=np.float64)  # before the negative rule
    noise = allocation_noise(lambda t: solve(t)["bits"], raw, stderr, sol["bits"], list(alloc),
                             cfg.noise_draws, cfg.noise_seed, cfg.negative_traces)
    no_stderr = [n for n in alloc if result["layers"][n].get("stderr") is None]
    if cfg.noise_draws and noise["same_allocation"] < 0.5:
        worst = sorted(noise["layers_changed"].items(), key=lambda kv: -kv[1])[:5]
        warnings.warn(f"the allocation is decided within the trace noise: re-solved with traces drawn from their "
                      f"standard errors, only {100 * noise['same_allocation']:.0f}% of {cfg.noise_draws} draws give "
                      f"the same bits (on average {noise['mean_changed_layers']:.1f} layers change; most often "
                      f"{[n for n, _ in worst]}); run `detr-ptq sensitivity` with more probes", stacklevel=2)

    layers: dict[str, dict] = {}
    for n in qlayers:
        r = result["layers"].get(n, {})
        entry = {"w_bits": FULL_PRECISION, "a_bits": None, "excluded": n not in alloc,
                 "trace": r.get("trace"), "avg_trace": r.get("avg_trace"), "stderr": r.get("stderr"),
                 "rel_stderr": r.get("rel_stderr")}
        if n in alloc:
            i = list(alloc).index(n)
            entry["w_bits"] = sol["bits"][i]
            entry["omega"] = {str(b): float(omega[i, j]) for j, b in enumerate(bits)}
        layers[n] = entry
    cost = cost_summary(model, {n: (e["w_bits"], None) for n, e in layers.items()}, tuple(cfg.input_size),
                        macs=macs or measure_macs(model, tuple(cfg.input_size)))
    summary = {"status": sol["status"], "objective": sol["objective"], "avg_w_bits": sol["avg_bits"],
               "target_bits": cfg.target_bits, "solve_seconds": sol["seconds"], "candidate_bits": bits,
               "allocated_layers": len(alloc), "excluded_layers": [n for n in qlayers if n not in alloc],
               "negative_traces_clamped": len(clamped), "clamped_layers": clamped,
               "negative_traces_rule": cfg.negative_traces, "noise": noise, "layers_without_stderr": no_stderr,
               "size_mb": cost["size_bytes"] / 1e6, "gbops": cost["bops"] / 1e9,
               "avg_w_bits_all_quantizable": cost["avg_w_bits"], "input_size": list(cfg.input_size)}
    return make_policy(model_name, layers, "hessian-ilp", summary, metric=cfg.metric, target_bits=cfg.target_bits,
                       omega_trace=cfg.omega_trace, candidate_bits=bits, exclude=list(cfg.exclude),
                       ref_bits=ref_bits)

"""Turn the hypernet's importance logits into a policy file (argmax bits per layer) and a bar chart.

The policy covers EVERY quantizable layer of the model (``gmpq.quant.policy`` contract): searched layers get their
argmax ``w_bits``/``a_bits`` plus the search's evidence (probabilities, candidates, MACs, expected bits); every
other layer (first conv, classifier, unsearched Linear) is ``{"w_bits": 32, "a_bits": null}``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gmpq.io import atomic_write_bytes
from gmpq.models import create_model, is_search_variant
from gmpq.quant.cost import cost_summary
from gmpq.quant.modules import quantizable_layers
from gmpq.quant.policy import make_policy
from gmpq.search.hypernet import full_precision_entry, mixed_layers
from gmpq.search.losses import BITS_FLOAT
from gmpq.search.mixed import WEIGHT_QUANTIZER


@torch.no_grad()
def policy_layers(hypernet: nn.Module, all_layers: Sequence[str], macs: dict[str, int]) -> dict[str, dict]:
    """Policy entries for ``all_layers`` (the float model's quantizable layers, in order)."""
    mixed = mixed_layers(hypernet)
    layers = {}
    for name in all_layers:
        m = mixed.get(name)
        if m is None:
            layers[name] = {**full_precision_entry(), "macs": int(macs[name])}  # derive needs the fixed BOPs
            continue
        w, a = m.argmax_bits()
        layers[name] = {
            "w_bits": w, "a_bits": a,
            "w_probs": [round(float(v), 6) for v in m.w_probs()],
            "a_probs": [round(float(v), 6) for v in m.a_probs()],
            **WEIGHT_QUANTIZER,  # the deployed layer quantizes its weights as the search did
            "w_candidates": list(m.w_bits), "a_candidates": list(m.a_bits),
            "expected_w_bits": round(float(m.expected_w_bits()), 6),
            "expected_a_bits": round(float(m.expected_a_bits()), 6),
            "macs": int(macs[name]),
        }
    return layers


@torch.no_grad()
def expected_total_bops(hypernet: nn.Module, all_layers: Sequence[str], macs: dict[str, int]) -> float:
    """Expected BOPs per image of the whole model: searched layers at E[q_w] E[q_a], the rest at 32 x 32."""
    mixed = mixed_layers(hypernet)
    total = 0.0
    for name in all_layers:
        m = mixed.get(name)
        bits = (float(m.expected_w_bits()) * float(m.expected_a_bits())) if m is not None else BITS_FLOAT**2
        total += macs[name] * bits
    return total


def fixed_bops(all_layers: Sequence[str], searched: Sequence[str], macs: dict[str, int]) -> float:
    """BOPs per image of the layers kept in full precision (32 x 32 bits)."""
    return float(sum(macs[n] for n in all_layers if n not in searched)) * BITS_FLOAT**2


def deployment_model(ref_model: nn.Module, model_name: str) -> nn.Module:
    """``ref_model`` itself, or, for a search-time variant, the deployment model it stands for: the registry's
    model with its own classifier (e.g. the 1000-class ImageNet network; the search's MACs count the same head), so
    the policy's size is that of the model it will be applied to."""
    return create_model(model_name) if is_search_variant(ref_model) else ref_model


def summary_from_cost(cost: dict) -> dict:
    """The cost part of a policy ``summary`` from ``gmpq.quant.cost.cost_summary``; both BOPs conventions."""
    return {
        "bops_g": cost["bops"] / 1e9,
        "float_bops_g": cost["float_bops"] / 1e9,
        "quantized_bops_g": cost["quantized_bops"] / 1e9,
        "quantized_float_bops_g": cost["quantized_float_bops"] / 1e9,
        "bops_conventions": BOPS_CONVENTIONS,
        "macs_m": cost["macs"] / 1e6,
        "size_mb": cost["size_bytes"] / 1e6,
        "float_size_mb": cost["float_size_bytes"] / 1e6,
        "avg_w_bits": cost["avg_w_bits"],
        "avg_a_bits": cost["avg_a_bits"],
        "compression": cost["compression"],
    }


BOPS_CONVENTIONS = {"bops_g": "whole model: full-precision layers (first conv, classifier) count at 32 x 32 bits",
                    "quantized_bops_g": "quantized layers only: the convention of the GMPQ/EdMIPS papers' tables"}


def build_policy(hypernet: nn.Module, ref_model: nn.Module, model_name: str, macs: dict[str, int],
                 input_size: Sequence[int], method: str, epoch: int | None = None, **created_by) -> dict:
    """The policy dict; ``ref_model`` is the float model (same layer names) used for the cost summary (for a
    search-time variant, the deployment model is built for it)."""
    all_layers = list(quantizable_layers(ref_model))
    layers = policy_layers(hypernet, all_layers, macs)
    bits = {n: (e["w_bits"], e["a_bits"]) for n, e in layers.items()}
    cost = cost_summary(deployment_model(ref_model, model_name), bits, input_size, macs=macs)
    summary = {
        "expected_bops_g": expected_total_bops(hypernet, all_layers, macs) / 1e9,
        **summary_from_cost(cost),
        "input_size": list(input_size),
        "searched_layers": sum(1 for e in layers.values() if "w_probs" in e),
    }
    if epoch is not None:
        summary["epoch"] = epoch
    return make_policy(model_name, layers, method, summary, **created_by)


def save_bits_chart(policy: dict, path: str | os.PathLike) -> Path:
    """PNG bar chart of the searched bits per layer (weights and activations side by side), written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    rows = [(n, e) for n, e in policy["layers"].items() if "w_probs" in e]
    names = [n for n, _ in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4))
    ax.bar([i - 0.2 for i in x], [e["w_bits"] for _, e in rows], width=0.4, label="weights")
    ax.bar([i + 0.2 for i in x], [e["a_bits"] for _, e in rows], width=0.4, label="activations")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("bits")
    s = policy.get("summary", {})
    ax.set_title(f"{policy['model']} ({policy['created_by']['method']}): {s.get('bops_g', 0):.4f} GBOPs, "
                 f"avg w bits {s.get('avg_w_bits', 0):.2f}")
    # the legend sits right of the axes (inside, it covered the tallest bars); the layers kept in float are named
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    kept = [f"{n} (W{e['w_bits']}A{e['a_bits'] or 32})" for n, e in policy["layers"].items() if "w_probs" not in e]
    if kept:
        fig.text(0.01, 0.01, f"not searched (32 = float): {', '.join(kept)}", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04 if kept else 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def policy_with_costs(policy: dict, model: nn.Module, input_size: Sequence[int], macs: dict[str, int] | None = None
                      ) -> dict:
    """``policy`` with its ``summary`` costs (both BOPs conventions, size) recomputed on ``model`` (the deployment
    model, or a search-time variant of it)."""
    from gmpq.quant.policy import layer_bits

    name = policy["model"]
    dep = deployment_model(model, name)
    cost = cost_summary(dep, layer_bits(policy, dep), input_size, macs=macs)
    out = dict(policy)
    out["summary"] = {**policy.get("summary", {}), **summary_from_cost(cost), "input_size": list(input_size)}
    return out


def budget_exact_policy(policy: dict, model: nn.Module, input_size: Sequence[int], gbops: float | None = None,
                        size_mb: float | None = None, convention: str = "whole", macs: dict[str, int] | None = None,
                        min_fraction: float | None = None) -> dict:
    """The search's policy re-derived within a BOPs and/or size budget (``gmpq.search.derive``), with its costs.

    The search loop calls it at the end of a target-mode search: ``budget_exact_policy(policy, ref,
    spec.input_size, gbops=cfg.loss.target_gbops)``; ``gmpq policy derive`` calls it on a finished run.
    """
    from gmpq.search.derive import derive_policy

    dep = deployment_model(model, policy["model"])
    params, fixed_bits = None, 0.0
    if size_mb is not None:
        qlayers = quantizable_layers(dep)
        searched = [n for n, e in policy["layers"].items() if "w_probs" in e]
        params = {n: qlayers[n].weight.numel() for n in searched}
        fixed_bits = 32.0 * (sum(p.numel() for p in dep.parameters()) - sum(params.values()))
    derived = derive_policy(policy, gbops, size_mb, convention, params, fixed_bits, min_fraction=min_fraction)
    return policy_with_costs(derived, dep, input_size, macs)


def final_policy(policy: dict, cfg, ref_model: nn.Module, input_size: Sequence[int], epoch: int) -> dict:
    """The policy a search writes after ``epoch``: at the end of a target-mode search (and unless
    ``loss.final_policy: argmax``) the budget-exact policy at ``loss.target_gbops`` (same entries, same evidence,
    bits re-chosen by the ILP); otherwise ``policy`` (the argmax) unchanged. An infeasible budget keeps the argmax
    with a warning instead of failing at the end of a long run."""
    lc = cfg.loss
    if lc.complexity_mode != "target" or lc.final_policy != "budget" or epoch < cfg.epochs:
        return policy
    from gmpq.errors import UserError

    try:
        return budget_exact_policy(policy, ref_model, input_size, gbops=lc.target_gbops)
    except UserError as e:
        print(f"warning: kept the argmax policy: {e}", flush=True)
        return policy

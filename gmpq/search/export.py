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
from gmpq.quant.cost import cost_summary
from gmpq.quant.modules import quantizable_layers
from gmpq.quant.policy import make_policy
from gmpq.search.hypernet import full_precision_entry, mixed_layers
from gmpq.search.losses import BITS_FLOAT


@torch.no_grad()
def policy_layers(hypernet: nn.Module, all_layers: Sequence[str], macs: dict[str, int]) -> dict[str, dict]:
    """Policy entries for ``all_layers`` (the float model's quantizable layers, in order)."""
    mixed = mixed_layers(hypernet)
    layers = {}
    for name in all_layers:
        m = mixed.get(name)
        if m is None:
            layers[name] = full_precision_entry()
            continue
        w, a = m.argmax_bits()
        layers[name] = {
            "w_bits": w, "a_bits": a,
            "w_probs": [round(float(v), 6) for v in m.w_probs()],
            "a_probs": [round(float(v), 6) for v in m.a_probs()],
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


def build_policy(hypernet: nn.Module, ref_model: nn.Module, model_name: str, macs: dict[str, int],
                 input_size: Sequence[int], method: str, epoch: int | None = None, **created_by) -> dict:
    """The policy dict; ``ref_model`` is the float model (same layer names) used for the cost summary."""
    all_layers = list(quantizable_layers(ref_model))
    layers = policy_layers(hypernet, all_layers, macs)
    bits = {n: (e["w_bits"], e["a_bits"]) for n, e in layers.items()}
    cost = cost_summary(ref_model, bits, input_size, macs=macs)
    summary = {
        "expected_bops_g": expected_total_bops(hypernet, all_layers, macs) / 1e9,
        "bops_g": cost["bops"] / 1e9,
        "float_bops_g": cost["float_bops"] / 1e9,
        "macs_m": cost["macs"] / 1e6,
        "size_mb": cost["size_bytes"] / 1e6,
        "float_size_mb": cost["float_size_bytes"] / 1e6,
        "avg_w_bits": cost["avg_w_bits"],
        "avg_a_bits": cost["avg_a_bits"],
        "compression": cost["compression"],
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
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())

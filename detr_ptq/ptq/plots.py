"""The paper's figures as PNGs (matplotlib, Agg backend, written atomically).

Figure 1: log10 of the Hessian trace and of the average trace per layer, one column per metric.
Figure 2: the bit-width of every layer in one or more policies.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from gmpq.io import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_traces(sens: dict, path: str | Path) -> Path:
    """Figure 1: log10 of the Hessian trace (top row) and of the average trace = trace / parameters (bottom row)
    per layer (x = layer index in definition order), one column per metric. Non-positive estimates are drawn as
    hollow red markers at the panel's floor."""
    plt = _pyplot()
    metrics = list(sens["metrics"])
    names = sens["layers"]
    fig, axes = plt.subplots(2, len(metrics), figsize=(5 * len(metrics), 6.4), squeeze=False)
    for row, key in enumerate(("trace", "avg_trace")):
        for ax, metric in zip(axes[row], metrics):
            vals = np.asarray([sens["metrics"][metric]["layers"][n][key] for n in names], dtype=float)
            pos = vals > 0
            logs = np.full_like(vals, np.nan)
            logs[pos] = np.log10(vals[pos])
            floor = np.nanmin(logs) - 1 if pos.any() else 0.0
            x = np.arange(len(names))
            ax.bar(x[pos], logs[pos] - floor, bottom=floor, width=0.8, color="tab:blue")
            if (~pos).any():
                ax.scatter(x[~pos], np.full((~pos).sum(), floor), facecolors="none", edgecolors="tab:red", s=12,
                           label="estimate <= 0")
                ax.legend(loc="upper right", fontsize=7)
            ax.set_title(metric if row == 0 else "")
            ax.set_xlabel("layer index")
            ax.set_ylabel(f"log10 {key.replace('_', ' ')}")
    fig.suptitle("Hessian trace per layer")
    return _save(fig, path)


def plot_bits(policies: dict[str, dict], path: str | Path) -> Path:
    """Figure 2: bits per layer; ``policies`` maps a label to a policy dict (full-precision layers omitted)."""
    plt = _pyplot()
    first = next(iter(policies.values()))
    names = [n for n, e in first["layers"].items() if e["w_bits"] < 32]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(names) + 3), 3.6))
    width = 0.8 / len(policies)
    for k, (label, pol) in enumerate(policies.items()):
        bits = [pol["layers"][n]["w_bits"] for n in names]
        ax.bar(np.arange(len(names)) + k * width, bits, width=width, label=label)
    ax.set_xlabel("layer index (heads excluded)")
    ax.set_ylabel("weight bits")
    ax.legend(fontsize=7)
    ax.set_title("bit-width per layer")
    return _save(fig, path)

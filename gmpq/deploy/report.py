"""``gmpq report``: compare runs (``result.json`` files) in one table and an accuracy-versus-BOPs plot.

A run's row also gets, when available: the BOPs of the quantized layers only (the papers' convention; from the
result or the summary of its policy file) and the Attribution Rank Distance to the float model (``ard``, the
``ard_mean`` of ``gmpq attribution``'s ``attribution.json`` in the run folder or its ``attribution/`` subfolder).
With ``group=True`` runs whose names differ only by a ``_seedN`` suffix are summarised as mean and standard deviation.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path

from gmpq.errors import UserError
from gmpq.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

COLUMNS = [("name", "run", "{}"), ("method", "method", "{}"), ("top1", "top-1 (%)", "{:.2f}"),
           ("top5", "top-5 (%)", "{:.2f}"), ("bops_g", "BOPs whole model (G)", "{:.4f}"),
           ("quantized_bops_g", "BOPs quantized layers (G)", "{:.4f}"), ("size_mb", "size (MB)", "{:.4f}"),
           ("compression", "compression", "{:.2f}x"), ("avg_w_bits", "avg w bits", "{:.2f}"),
           ("avg_a_bits", "avg a bits", "{:.2f}"), ("ard", "ARD", "{:.2f}")]
PERCENT = ("top1", "top5")
OPTIONAL = ("quantized_bops_g", "ard")  # shown only when some run has them
SEED_SUFFIX = re.compile(r"[_-]seed\d+$")


def _attribution_file(result_path: Path) -> Path | None:
    for cand in (result_path.parent / "attribution" / "attribution.json", result_path.parent / "attribution.json"):
        if cand.is_file():
            return cand
    return None


def _add_optional(r: dict, result_path: Path) -> None:
    """Fill ``quantized_bops_g`` from the run's policy file and ``ard`` from its attribution result, if missing."""
    pol = r.get("policy")
    if r.get("quantized_bops_g") is None and isinstance(pol, str) and Path(pol).is_file():
        summary = read_json(pol, what="policy file").get("summary", {})
        q = summary.get("quantized_bops_g") if isinstance(summary, dict) else None
        if isinstance(q, (int, float)):
            r["quantized_bops_g"] = q
    att = _attribution_file(result_path)
    if r.get("ard") is None and att is not None:
        a = read_json(att, what="attribution result")
        if not isinstance(a, dict) or not isinstance(a.get("ard_mean"), (int, float)):
            raise UserError(f"attribution result {str(att)!r} has no number ard_mean (write it with gmpq attribution)")
        r.update(ard=a["ard_mean"], ard_images=a.get("n_images"), attribution=str(att))


def load_results(paths: list[str | os.PathLike]) -> list[dict]:
    """Read result files; ``name`` defaults to the parent folder's name."""
    rows = []
    for p in paths:
        r = read_json(p, what="result file")
        if not isinstance(r, dict):
            raise UserError(f"result file {str(p)!r} must hold a JSON object (a result.json of gmpq finetune or "
                            f"gmpq evaluate --out)")
        bad = [f"{k}={r[k]!r}" for k, _, fmt in COLUMNS if k in r and r[k] is not None and "f" in fmt
               and (isinstance(r[k], bool) or not isinstance(r[k], (int, float)))]
        if bad:
            raise UserError(f"result file {str(p)!r}: {', '.join(bad)} should be number(s)")
        r.setdefault("name", Path(p).parent.name)
        _add_optional(r, Path(p))
        rows.append(r)
    return rows


def markdown_table(rows: list[dict], extra: list[str] | None = None) -> str:
    """One row per run; ``extra`` names additional keys (e.g. ``top1_jpeg``) shown as percentages."""
    return markdown_table_cols(rows, _columns(rows, extra))


def markdown_table_cols(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """``cols``: (key, header, format) triples; a missing value shows as ``-``."""
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(key), key, fmt) for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def _columns(rows: list[dict], extra: list[str] | None) -> list[tuple[str, str, str]]:
    cols = [c for c in COLUMNS if c[0] not in OPTIONAL or any(r.get(c[0]) is not None for r in rows)]
    return cols + [(k, k, "{:.2f}") for k in (extra or [])]


def _cell(v, key: str, fmt: str) -> str:
    if v is None:
        return "-"
    scale = 100 if (key in PERCENT or key.startswith("top")) else 1
    if isinstance(v, dict):  # a group's {"mean", "std", "n"}
        std = "" if v["std"] is None else " ± " + fmt.rstrip("x").format(scale * v["std"])
        return fmt.format(scale * v["mean"]) + std
    return fmt.format(scale * v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def group_rows(rows: list[dict], keys: list[str]) -> list[dict]:
    """One row per group of runs whose names differ only by a ``_seedN`` suffix (first-seen order): each numeric key
    becomes ``{"mean", "std", "n"}`` (std: sample standard deviation over the runs, None for a single run)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(SEED_SUFFIX.sub("", str(r["name"])), []).append(r)
    out = []
    for name, members in groups.items():
        g = {"name": name, "method": members[0].get("method"), "runs": len(members)}
        for k in keys:
            vals = [float(m[k]) for m in members if isinstance(m.get(k), (int, float)) and not isinstance(m[k], bool)]
            if vals and all(math.isfinite(v) for v in vals):
                g[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                        "n": len(vals)}
        out.append(g)
    return out


def plot(rows: list[dict], path: str | os.PathLike, title: str = "accuracy vs BOPs") -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("bops_g") is None or r.get("top1") is None:
            continue
        ax.scatter(r["bops_g"], 100 * r["top1"], s=40)
        ax.annotate(r["name"], (r["bops_g"], 100 * r["top1"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.margins(x=0.12, y=0.08)  # room for the run labels next to the outermost points
    ax.set_xlabel("BOPs per image (G)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")  # "tight": a long run label is never clipped
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def report(paths: list[str | os.PathLike], out_dir: str | os.PathLike, extra: list[str] | None = None,
           title: str = "accuracy vs BOPs", group: bool = False) -> dict:
    """Write ``report.md``, ``report.json`` and ``report.png`` into ``out_dir``; returns the JSON content. With
    ``group`` the table first gives mean ± std over the seeds of each run (``groups`` in the JSON), then every run."""
    rows = load_results(paths)
    out = Path(out_dir)
    table = markdown_table(rows, extra)
    result = {"runs": rows}
    if group:
        keys = [c[0] for c in COLUMNS if "f" in c[2]] + list(extra or [])
        result["groups"] = group_rows(rows, keys)
        runs_col = [("runs", "seeds", "{}")]
        cols = _columns(result["groups"], extra)
        grouped = markdown_table_cols(result["groups"], cols[:2] + runs_col + cols[2:])
        table = "mean ± std over seeds\n\n" + grouped + "\n\nevery run\n\n" + table
    atomic_write_text(out / "report.md", table + "\n")
    atomic_write_json(out / "report.json", result)
    plot(rows, out / "report.png", title)
    return {**result, "markdown": table}


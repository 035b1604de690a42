"""``gmpq report``: compare runs (``result.json`` files) in one table and an accuracy-versus-BOPs plot."""

from __future__ import annotations

import os
from pathlib import Path

from gmpq.errors import UserError
from gmpq.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

COLUMNS = [("name", "run", "{}"), ("method", "method", "{}"), ("top1", "top-1 (%)", "{:.2f}"),
           ("top5", "top-5 (%)", "{:.2f}"), ("bops_g", "BOPs (G)", "{:.4f}"), ("size_mb", "size (MB)", "{:.4f}"),
           ("compression", "compression", "{:.2f}x"), ("avg_w_bits", "avg w bits", "{:.2f}"),
           ("avg_a_bits", "avg a bits", "{:.2f}")]
PERCENT = ("top1", "top5")


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
        rows.append(r)
    return rows


def markdown_table(rows: list[dict], extra: list[str] | None = None) -> str:
    """One row per run; ``extra`` names additional keys (e.g. ``top1_jpeg``) shown as percentages."""
    cols = list(COLUMNS) + [(k, k, "{:.2f}") for k in (extra or [])]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if v is None:
                cells.append("-")
            else:
                cells.append(fmt.format(100 * v if (key in PERCENT or key.startswith("top")) else v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
           title: str = "accuracy vs BOPs") -> dict:
    """Write ``report.md``, ``report.json`` and ``report.png`` into ``out_dir``; returns the JSON content."""
    rows = load_results(paths)
    out = Path(out_dir)
    table = markdown_table(rows, extra)
    atomic_write_text(out / "report.md", table + "\n")
    atomic_write_json(out / "report.json", {"runs": rows})
    plot(rows, out / "report.png", title)
    return {"runs": rows, "markdown": table}

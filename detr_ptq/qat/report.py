"""``detr-ptq qat-report``: the README tables from the ``result.json`` files of QAT runs.

Two tables: the module ablation (runs whose policy is uniform and that quantize a subset of the parts, plus
the full baseline) and the distillation ablation (every part quantized: baseline, +DA, +FQM, +DA+FQM).
"""

from __future__ import annotations

import json
from pathlib import Path

from detr_ptq.qat.config import PARTS
from gmpq.errors import UserError
from gmpq.io import atomic_write_text

ABLATION_LABELS = {1: "backbone", 2: "+ encoder", 3: "+ decoder attention", 4: "+ decoder MLPs (all)"}


def load_results(folder: str | Path) -> list[dict]:
    paths = sorted(Path(folder).glob("*/result.json"))
    if not paths:
        raise UserError(f"no */result.json under {str(folder)!r}; run `detr-ptq qat` with out_dir inside it")
    return [dict(json.loads(p.read_text()), _dir=p.parent.name) for p in paths]


def _bits(r: dict) -> str:
    return f"W{r['w_bits']}A{r['a_bits']} (attn {r['attn_bits']})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _row(r: dict, label: str) -> str:
    before = r["before"].get("AP50")
    return (f"| {_bits(r)} | {label} | {_pct(r['AP'])} | {_pct(r['AP50'])} | {_pct(before)} | "
            f"{_pct(r['recovery_AP50'])} % | {r['gbops']:.3f} | {r['train_seconds'] / 60:.1f} | `{r['_dir']}` |")


HEADER = ("| bits | {what} | AP | AP50 | AP50 before QAT | AP50 / float | GBOPs | minutes | run |\n"
          "|---|---|---|---|---|---|---|---|---|")


def module_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["policy"] or r["align"] or r["fqm"] or r["two_stage"]:
            continue
        n = len(r["quantize"])
        if list(r["quantize"]) == list(PARTS[:n]):
            rows.append((-r["w_bits"], n, _row(r, ABLATION_LABELS[n])))
    return "\n".join([HEADER.format(what="quantized parts")] + [x[2] for x in sorted(rows)])


def distill_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["policy"] or r["two_stage"] or list(r["quantize"]) != list(PARTS):
            continue
        label = {(False, False): "baseline", (True, False): "+ DA", (False, True): "+ FQM",
                 (True, True): "+ DA + FQM"}[(r["align"], r["fqm"])]
        rows.append((-r["w_bits"], r["attn_bits"], r["align"] + 2 * r["fqm"], _row(r, label)))
    return "\n".join([HEADER.format(what="method")] + [x[3] for x in sorted(rows)])


def report(folder: str | Path, out: str | Path | None = None) -> str:
    results = load_results(folder)
    floats = {round(r["float"]["AP50"], 4) for r in results if r.get("float")}
    text = (f"Float reference: AP50 {', '.join(_pct(f) for f in sorted(floats))} on {results[0]['images']} "
            f"held-out images.\n\n### Module ablation (no DA, no FQM)\n\n{module_table(results)}\n\n"
            f"### Distribution alignment and foreground-aware query matching\n\n{distill_table(results)}\n")
    if out:
        atomic_write_text(out, text)
    return text

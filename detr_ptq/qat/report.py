"""``detr-ptq qat-report``: the README tables from the ``result.json`` files of QAT runs.

Runs that differ only in their seed are one row: mean ± sample standard deviation over the seeds (n given), so a
reader can tell a method's gain from noise. Two tables: the module ablation (uniform policy, a prefix of the
parts quantized, no distillation) and the distillation ablation (every part quantized: baseline, + DA, + FQM,
+ DA + FQM), the latter with the difference to the baseline of the same bits and its standard error. Every row
names its bits, including the attention operands (``attn``), and its runs.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from detr_ptq.qat.config import PARTS
from gmpq.errors import UserError
from gmpq.io import atomic_write_text

ABLATION_LABELS = {1: "backbone", 2: "+ encoder", 3: "+ decoder attention", 4: "+ decoder MLPs (all)"}
# The settings that make two runs the same experiment (the seed and the output folder do not).
SETTING_KEYS = ("policy", "w_bits", "a_bits", "attn_bits", "quantize", "align", "align_init", "fqm", "fqm_tau",
                "distill_weight", "two_stage", "epochs", "max_steps_per_epoch", "batch_size", "lr", "augment")
# Results written before these settings existed used the behaviour of that time.
OLD_DEFAULTS = {"align_init": "identity", "augment": False}


def load_results(folder: str | Path) -> list[dict]:
    paths = sorted(Path(folder).glob("*/result.json"))
    if not paths:
        raise UserError(f"no */result.json under {str(folder)!r}; run `detr-ptq qat` with out_dir inside it")
    return [{**OLD_DEFAULTS, **_renamed(json.loads(p.read_text())), "_dir": p.parent.name} for p in paths]


def _renamed(result: dict) -> dict:
    """Results written before the shared run settings: ``steps_per_epoch`` (0 = all) is ``max_steps_per_epoch``."""
    if "steps_per_epoch" in result:
        result["max_steps_per_epoch"] = result.pop("steps_per_epoch") or None
    return result


def group_by_settings(results: list[dict]) -> list[list[dict]]:
    """Runs with equal ``SETTING_KEYS`` (seeds of one experiment), in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        key = json.dumps([r.get(k) for k in SETTING_KEYS], sort_keys=True)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float | None]) -> str:
    xs = [100 * v for v in values if v is not None]
    if not xs:
        return "n/a"
    m, sd = mean_sd(xs)
    return f"{m:.1f}" if len(xs) == 1 else f"{m:.1f} ± {sd:.1f}"


def _bits(r: dict) -> str:
    return f"W{r['w_bits']}A{r['a_bits']}"


def _row(runs: list[dict], label: str, extra: str = "") -> str:
    r = runs[0]
    seeds = ",".join(str(x.get("seed", "?")) for x in runs)
    minutes = statistics.fmean(x["train_seconds"] for x in runs) / 60
    steps = r["epochs"] * r["max_steps_per_epoch"] if r.get("max_steps_per_epoch") else f"{r['epochs']} ep"
    return (f"| {_bits(r)} | {r['attn_bits']} | {label} | {len(runs)} ({seeds}) | {steps} | "
            f"{_fmt([x['AP'] for x in runs])} | {_fmt([x['AP50'] for x in runs])} | "
            f"{_fmt([x['before'].get('AP50') for x in runs])} | {_fmt([x['recovery_AP50'] for x in runs])} %"
            f"{extra} | {r['gbops']:.3f} | {minutes:.1f} | {' '.join('`' + x['_dir'] + '`' for x in runs)} |")


def _header(what: str, extra: tuple[str, ...] = ()) -> str:
    cols = ("bits", "attn", what, "seeds", "steps", "AP", "AP50", "AP50 before QAT", "AP50 / float", *extra,
            "GBOPs", "minutes", "runs")
    return f"| {' | '.join(cols)} |\n|{'---|' * len(cols)}"


def module_table(results: list[dict]) -> str:
    rows = []
    for runs in group_by_settings(results):
        r = runs[0]
        if r["policy"] or r["align"] or r["fqm"] or r["two_stage"]:
            continue
        n = len(r["quantize"])
        if list(r["quantize"]) == list(PARTS[:n]):
            rows.append((-r["w_bits"], r["attn_bits"], n, _row(runs, ABLATION_LABELS[n])))
    return "\n".join([_header("quantized parts")] + [x[-1] for x in sorted(rows)])


def _method(r: dict) -> tuple[int, str]:
    da = "+ DA" if r["align_init"] == "identity" else "+ DA (BN start)"
    label = {(False, False): "baseline", (True, False): da, (False, True): "+ FQM",
             (True, True): f"{da} + FQM"}[(r["align"], r["fqm"])]
    return r["align"] + 2 * r["fqm"] + (0.5 if r["align"] and r["align_init"] != "identity" else 0), label


def _delta(runs: list[dict], base: list[dict] | None) -> str:
    """AP50 difference to the baseline of the same setting, ± its standard error sqrt(sd1^2/n1 + sd2^2/n2)."""
    if base is None or runs is base:
        return " | "
    a, b = [100 * x["AP50"] for x in runs], [100 * x["AP50"] for x in base]
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return f" | {ma - mb:+.1f} ± {se:.1f}" if len(a) > 1 and len(b) > 1 else f" | {ma - mb:+.1f}"


def distill_table(results: list[dict]) -> str:
    groups = [g for g in group_by_settings(results)
              if not g[0]["policy"] and not g[0]["two_stage"] and list(g[0]["quantize"]) == list(PARTS)]
    base_keys = ("w_bits", "a_bits", "attn_bits", "epochs", "max_steps_per_epoch", "lr", "augment")
    bases = {tuple(g[0][k] for k in base_keys): g for g in groups if not g[0]["align"] and not g[0]["fqm"]}
    rows = []
    for runs in groups:
        r = runs[0]
        order, label = _method(r)
        delta = _delta(runs, bases.get(tuple(r[k] for k in base_keys)))
        rows.append((-r["w_bits"], r["attn_bits"], r["epochs"] * (r["max_steps_per_epoch"] or 1), order,
                     _row(runs, label, delta)))
    return "\n".join([_header("method", ("Δ AP50 vs baseline",))] + [x[-1] for x in sorted(rows)])


def report(folder: str | Path, out: str | Path | None = None) -> str:
    results = load_results(folder)
    floats = {round(r["float"]["AP50"], 4) for r in results if r.get("float")}
    text = (f"Float reference: AP50 {', '.join(_fmt([f]) for f in sorted(floats))} on {results[0]['images']} "
            f"held-out images. attn = bits of the attention operands (q, k, softmax map, v); mean ± sample "
            f"standard deviation over the seeds; Δ = difference of means ± its standard error.\n\n"
            f"### Module ablation (no DA, no FQM)\n\n{module_table(results)}\n\n"
            f"### Distribution alignment and foreground-aware query matching\n\n{distill_table(results)}\n")
    if out:
        atomic_write_text(out, text)
    return text

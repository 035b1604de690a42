"""``reproduce_table(cfg) -> rows``: the paper's Table 1 on one detector.

Float, uniform 8/6/5/4-bit weights (heads full precision), and the Hessian-ILP policy of each metric
(``loss``, ``output-float``, ``output-quant``) at average targets 6, 5 and 4 bits; every model is evaluated
with COCO box AP on the same split. Delta = AP of the policy - AP of the uniform model at the same average bits.

The sensitivities are Monte Carlo estimates on a calibration sample, so the ILP rows are repeated over ``draws``
calibration draws (draw d: calibration seed ``calib.seed + d``, probe seed ``hutchinson.seed + d``) and reported
as mean, standard deviation and range over the draws; float and uniform rows do not depend on the calibration.
Writes ``sensitivity_draw{d}.json``, ``fig1_traces.png`` (draw 0), one policy per (metric, target, draw),
``fig2_bits_w{t}.png`` (draw 0), ``table.md``, ``table.json`` and ``config.yaml`` into ``out_dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from detr_ptq.ptq.allocate import AllocateConfig, allocate
from detr_ptq.ptq.apply import eval_loader, evaluate_detr, load_float, quantize_detr, uniform_detr_policy
from detr_ptq.ptq.calibset import CalibConfig, calibration_loader, checkpoint_resize, load_batches
from detr_ptq.ptq.distill import DistillConfig
from detr_ptq.ptq.hutchinson import HutchinsonConfig
from detr_ptq.ptq.plots import plot_bits, plot_traces
from detr_ptq.ptq.sensitivity import DEFAULT_EXCLUDE, METRICS, SensitivityConfig, sensitivity
from gmpq.config import save_config
from gmpq.io import atomic_write_json, atomic_write_text, ensure_writable_dir
from gmpq.paths import expand_path
from gmpq.quant.policy import save_policy


@dataclass
class TableConfig:
    checkpoint: str = "detr_ptq/assets/detr_tiny_digits.pth"
    config: str = ""  # DETR preset; "" = the config stored in the checkpoint
    coco_dir: str = "runs/digits"  # evaluation folder (COCO layout)
    split: str = "val"
    out_dir: str = "runs/ptq_detr_tiny/table"
    uniform_bits: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    targets: list[float] = field(default_factory=lambda: [6.0, 5.0, 4.0])
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    calib: CalibConfig = field(default_factory=CalibConfig)
    hutchinson: HutchinsonConfig = field(default_factory=HutchinsonConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    allocate: AllocateConfig = field(default_factory=AllocateConfig)  # metric/target/exclude set per run
    batch_size: int = 8
    max_images: int = 0  # evaluation images; 0 = the whole split
    min_size: int = 0  # resize for calibration and evaluation; 0 = the checkpoint's training resize
    max_size: int = 0
    device: str = "cpu"  # e.g. cuda for DETR-R50 on COCO
    num_threads: int = 1
    draws: int = 3  # calibration draws (calibration set and probes) for the ILP rows

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ValueError(f"draws={self.draws} must be >= 1")


def _ap(metrics: dict) -> float:
    return 100.0 * float(metrics.get("AP") or 0.0)


def run_table(cfg: TableConfig, log: Callable[[str], None] = print) -> dict:
    """Stage: config -> ``{"rows": [...], "markdown": str}``; writes the artifacts listed above."""
    torch.set_num_threads(cfg.num_threads)
    out = ensure_writable_dir(expand_path(cfg.out_dir))
    save_config(cfg, out / "config.yaml")
    min_size, max_size = checkpoint_resize(cfg.checkpoint, cfg.min_size, cfg.max_size)
    model, criterion, post, dcfg = load_float(cfg.checkpoint, cfg.config)
    model.to(cfg.device)
    criterion.to(cfg.device)
    loader, gt = eval_loader(cfg.coco_dir, cfg.split, min_size, max_size, cfg.batch_size, cfg.max_images)
    rows: list[dict] = []

    def run(label: str, method: str, avg_bits: float, policy: dict | None) -> dict:
        t0 = time.perf_counter()
        m = model if policy is None else quantize_detr(copy.deepcopy(model), policy, dcfg.name, label)
        metrics = evaluate_detr(m, post, loader, gt, cfg.device)
        row = {"label": label, "method": method, "avg_bits": avg_bits, **metrics,
               "eval_seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        log(f"{label:>28}: avg bits {avg_bits:5.2f}  AP {_ap(metrics):6.2f}")
        return row

    run("float", "float", 32.0, None)
    for b in cfg.uniform_bits:
        run(f"uniform W{b}", "uniform", float(b), uniform_detr_policy(model, dcfg.name, b, cfg.exclude))

    uniform_ap = {r["avg_bits"]: _ap(r) for r in rows if r["method"] == "uniform"}
    for draw in range(cfg.draws):
        sens = _draw_sensitivity(cfg, model, criterion, min_size, max_size, draw, out, log)
        input_size = [3, min_size, max_size]
        for target in cfg.targets:
            policies = {}
            for metric in cfg.metrics:
                acfg = dataclasses.replace(cfg.allocate, metric=metric, target_bits=target,
                                           exclude=list(cfg.exclude), input_size=input_size)
                policy = allocate(model, sens, acfg, dcfg.name)
                save_policy(policy, out / f"policy_{metric}_w{target:g}_draw{draw}.json")
                policies[metric] = policy
                row = run(f"ILP {metric} W{target:g} draw {draw}", f"ilp-{metric}", policy["summary"]["avg_w_bits"],
                          policy)
                s = policy["summary"]
                row.update({"target_bits": target, "draw": draw, "negative_traces": s["negative_traces_clamped"],
                            "same_allocation_under_noise": s["noise"]["same_allocation"]})
                if target in uniform_ap:
                    row["delta_ap_vs_uniform"] = _ap(row) - uniform_ap[target]
            if draw == 0:
                plot_bits(policies, out / f"fig2_bits_w{target:g}.png")
    summary = summarize_draws(rows)
    md = format_table(rows, summary, dcfg.name, cfg)
    atomic_write_text(out / "table.md", md)
    atomic_write_json(out / "table.json", {"model": dcfg.name, "checkpoint": cfg.checkpoint, "split": cfg.split,
                                           "images": len(gt["images"]), "draws": cfg.draws, "rows": rows,
                                           "summary": summary})
    return {"rows": rows, "summary": summary, "markdown": md, "out_dir": str(out)}


def _draw_sensitivity(cfg: TableConfig, model, criterion, min_size: int, max_size: int, draw: int, out, log
                      ) -> dict:
    """Calibration draw ``draw``: its calibration set and probes -> ``sensitivity_draw{draw}.json``."""
    calib = dataclasses.replace(cfg.calib, min_size=cfg.calib.min_size or min_size,
                                max_size=cfg.calib.max_size or max_size, seed=cfg.calib.seed + draw)
    calib_loader, calib_report = calibration_loader(calib, calib.min_size, calib.max_size)
    log(f"draw {draw}: calibration {calib_report['used']} images of {calib_report['available']} (class TV distance "
        f"{calib_report['tv_to_folder']:.3f}, random sample {calib_report['tv_random_sample']:.3f})")
    hcfg = dataclasses.replace(cfg.hutchinson, seed=cfg.hutchinson.seed + draw)
    scfg = SensitivityConfig(checkpoint=cfg.checkpoint, config=cfg.config, out_dir=str(out),
                             metrics=list(cfg.metrics), exclude=list(cfg.exclude), calib=calib,
                             hutchinson=hcfg, distill=cfg.distill, device=cfg.device, num_threads=cfg.num_threads)
    sens = sensitivity(model, criterion, load_batches(calib_loader, cfg.device), scfg)
    sens["calibration"] = calib_report
    atomic_write_json(out / f"sensitivity_draw{draw}.json", sens)
    if draw == 0:
        plot_traces(sens, out / "fig1_traces.png")
    for metric in cfg.metrics:
        r = sens["metrics"][metric]
        log(f"draw {draw} sensitivity {metric}: {r['hvps']} HVPs in {r['seconds']:.1f} s, loss {r['loss_value']:.4g}")
    return sens


def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()),
            "max": float(a.max()), "n": len(a)}


def summarize_draws(rows: list[dict]) -> list[dict]:
    """One entry per (method, target) of the ILP rows: AP, delta AP, average bits, negative traces and the share of
    noise re-solves giving the same allocation, each as mean / std (ddof 1) / min / max over the draws."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "draw" in r:
            groups.setdefault((r["method"], r["target_bits"]), []).append(r)
    out = []
    for (method, target), rs in groups.items():
        entry = {"method": method, "target_bits": target, "AP": _stats([_ap(r) for r in rs]),
                 "AP50": _stats([100 * float(r.get("AP50") or 0) for r in rs]),
                 "avg_bits": _stats([r["avg_bits"] for r in rs]),
                 "negative_traces": _stats([r["negative_traces"] for r in rs]),
                 "same_allocation_under_noise": _stats([r["same_allocation_under_noise"] or 0.0 for r in rs])}
        if all("delta_ap_vs_uniform" in r for r in rs):
            entry["delta_ap_vs_uniform"] = _stats([r["delta_ap_vs_uniform"] for r in rs])
        out.append(entry)
    return out


def format_table(rows: list[dict], summary: list[dict], model_name: str, cfg: TableConfig) -> str:
    """Markdown in the layout of the paper's Table 1 (AP in points, 0-100); ILP rows as mean +- std over the
    calibration draws, with the range."""
    lines = [f"{model_name}, weight-only PTQ, COCO box AP on `{cfg.split}` (heads full precision); ILP rows: mean "
             f"+- std (min..max) over {cfg.draws} calibration draw(s)", "",
             "| W bits (target) | method | avg W bits | AP | AP50 | delta AP vs uniform | negative traces | "
             "same allocation under trace noise |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]

    def pm(st: dict, digits: int = 1) -> str:
        if st["n"] == 1:
            return f"{st['mean']:.{digits}f}"
        return f"{st['mean']:.{digits}f} +- {st['std']:.{digits}f} ({st['min']:.{digits}f}..{st['max']:.{digits}f})"

    for r in rows:
        if "draw" in r:
            continue
        target = "32" if r["method"] == "float" else f"{r['avg_bits']:g}"
        method = "full precision" if r["method"] == "float" else "uniform"
        lines.append(f"| {target} | {method} | {r['avg_bits']:.2f} | {_ap(r):.1f} | "
                     f"{100 * float(r.get('AP50') or 0):.1f} |  |  |  |")
    for e in summary:
        delta = pm(e["delta_ap_vs_uniform"]) if "delta_ap_vs_uniform" in e else ""
        lines.append(f"| {e['target_bits']:g} | ILP, {e['method'].replace('ilp-', '')} | {e['avg_bits']['mean']:.2f} | "
                     f"{pm(e['AP'])} | {pm(e['AP50'])} | {delta} | {e['negative_traces']['mean']:.1f} | "
                     f"{100 * e['same_allocation_under_noise']['mean']:.0f}% |")
    return "\n".join(lines) + "\n"

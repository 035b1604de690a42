"""``reproduce_table(cfg) -> rows``: the paper's Table 1 on one detector.

Float, uniform 8/6/5/4-bit weights (heads full precision), and the Hessian-ILP policy of each metric
(``loss``, ``output-float``, ``output-quant``) at average targets 6, 5 and 4 bits; every model is evaluated
with COCO box AP on the same split. Delta = AP of the policy - AP of the uniform model at the same average bits.
Writes ``sensitivity.json``, ``fig1_traces.png``, one policy per (metric, target), ``fig2_bits_w{t}.png``,
``table.md``, ``table.json`` and ``config.yaml`` into ``out_dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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

    calib = dataclasses.replace(cfg.calib, min_size=cfg.calib.min_size or min_size,
                                max_size=cfg.calib.max_size or max_size)
    calib_loader, calib_report = calibration_loader(calib, calib.min_size, calib.max_size)
    log(f"calibration: {calib_report['used']} images of {calib_report['available']} "
        f"(class TV distance {calib_report['tv_to_folder']:.3f}, random sample {calib_report['tv_random_sample']:.3f})")
    scfg = SensitivityConfig(checkpoint=cfg.checkpoint, config=cfg.config, out_dir=str(out),
                             metrics=list(cfg.metrics), exclude=list(cfg.exclude), calib=calib,
                             hutchinson=cfg.hutchinson, distill=cfg.distill, device=cfg.device,
                             num_threads=cfg.num_threads)
    sens = sensitivity(model, criterion, load_batches(calib_loader, cfg.device), scfg)
    sens["calibration"] = calib_report
    atomic_write_json(out / "sensitivity.json", sens)
    plot_traces(sens, out / "fig1_traces.png")
    for metric in cfg.metrics:
        r = sens["metrics"][metric]
        log(f"sensitivity {metric}: {r['hvps']} HVPs in {r['seconds']:.1f} s, loss {r['loss_value']:.4g}")

    input_size = [3, min_size, max_size]
    for target in cfg.targets:
        policies = {}
        for metric in cfg.metrics:
            acfg = dataclasses.replace(cfg.allocate, metric=metric, target_bits=target, exclude=list(cfg.exclude),
                                       input_size=input_size)
            policy = allocate(model, sens, acfg, dcfg.name)
            save_policy(policy, out / f"policy_{metric}_w{target:g}.json")
            policies[metric] = policy
            row = run(f"ILP {metric} W{target:g}", f"ilp-{metric}", policy["summary"]["avg_w_bits"], policy)
            row["target_bits"] = target
        plot_bits(policies, out / f"fig2_bits_w{target:g}.png")

    uniform_ap = {r["avg_bits"]: _ap(r) for r in rows if r["method"] == "uniform"}
    for r in rows:
        if r["method"].startswith("ilp-") and r["target_bits"] in uniform_ap:
            r["delta_ap_vs_uniform"] = _ap(r) - uniform_ap[r["target_bits"]]
    md = format_table(rows, dcfg.name, cfg)
    atomic_write_text(out / "table.md", md)
    atomic_write_json(out / "table.json", {"model": dcfg.name, "checkpoint": cfg.checkpoint, "split": cfg.split,
                                           "images": len(gt["images"]), "rows": rows})
    return {"rows": rows, "markdown": md, "out_dir": str(out)}


def format_table(rows: list[dict], model_name: str, cfg: TableConfig) -> str:
    """Markdown in the layout of the paper's Table 1 (AP in points, 0-100)."""
    lines = [f"{model_name}, weight-only PTQ, COCO box AP on `{cfg.split}` (heads full precision)", "",
             "| W bits (target) | method | avg W bits | AP | AP50 | AP75 | delta AP vs uniform |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    for r in rows:
        target = "32" if r["method"] == "float" else (f"{r['target_bits']:g}" if "target_bits" in r
                                                     else f"{r['avg_bits']:g}")
        delta = f"{r['delta_ap_vs_uniform']:+.1f}" if "delta_ap_vs_uniform" in r else ""
        method = {"float": "full precision", "uniform": "uniform"}.get(r["method"], r["method"].replace("ilp-",
                                                                                                        "ILP, "))
        lines.append(f"| {target} | {method} | {r['avg_bits']:.2f} | {fmt(r.get('AP'))} | {fmt(r.get('AP50'))} | "
                     f"{fmt(r.get('AP75'))} | {delta} |")
    return "\n".join(lines) + "\n"

"""The file-to-file stages behind the CLI verbs: each reads files, writes files atomically (with the resolved
config beside them) and returns a small dict for printing."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detr_ptq.ptq.allocate import AllocateConfig, allocate
from detr_ptq.ptq.apply import PTQConfig, eval_loader, evaluate_detr, load_float, quantize_detr, uniform_detr_policy
from detr_ptq.ptq.calibset import calibration_loader, checkpoint_resize, load_batches
from detr_ptq.ptq.plots import plot_bits, plot_traces
from detr_ptq.ptq.sensitivity import SensitivityConfig, sensitivity
from gmpq.config import save_config
from gmpq.errors import UserError
from gmpq.io import atomic_write_json, ensure_writable_dir, read_json
from gmpq.paths import expand_path
from gmpq.quant.policy import load_policy, save_policy


def run_sensitivity(cfg: SensitivityConfig, log=print) -> dict:
    """checkpoint + calibration folder -> ``out_dir/{sensitivity.json, fig1_traces.png, config.yaml}``."""
    torch.set_num_threads(cfg.num_threads)
    out = ensure_writable_dir(expand_path(cfg.out_dir))
    min_size, max_size = checkpoint_resize(cfg.checkpoint, cfg.calib.min_size, cfg.calib.max_size)
    cfg = dataclasses.replace(cfg, calib=dataclasses.replace(cfg.calib, min_size=min_size, max_size=max_size))
    save_config(cfg, out / "config.yaml")
    model, criterion, _, dcfg = load_float(cfg.checkpoint, cfg.config)
    model.to(cfg.device)
    criterion.to(cfg.device)
    loader, report = calibration_loader(cfg.calib, min_size, max_size)
    log(f"calibration: {report['used']} of {report['available']} images in {report['folder']} "
        f"(class TV distance to the folder {report['tv_to_folder']:.3f}; a random sample: "
        f"{report['tv_random_sample']:.3f})")
    batches = load_batches(loader, cfg.device)

    def progress(step: int, stats) -> None:
        if (step + 1) % 10 == 0:
            worst = max(stats.rel_stderr(k) for k in stats.mean)
            log(f"  probe {step + 1}: worst relative standard error {worst:.3f}")

    result = sensitivity(model, criterion, batches, cfg, progress)
    result.update({"checkpoint": cfg.checkpoint, "model": dcfg.name, "calibration": report})
    path = atomic_write_json(out / "sensitivity.json", result)
    plot_traces(result, out / "fig1_traces.png")
    for metric, r in result["metrics"].items():
        log(f"{metric}: {r['probes']} probes ({r['hvps']} HVPs) in {r['seconds']:.1f} s, stopped on {r['stopped']}")
    return {"path": str(path), "figure": str(out / "fig1_traces.png")}


@dataclass
class AllocateRun:
    sensitivity: str = "runs/ptq_detr_tiny/sensitivity/sensitivity.json"
    checkpoint: str = "detr_ptq/assets/detr_tiny_digits.pth"
    config: str = ""
    out: str = "runs/ptq_detr_tiny/policy.json"  # the figure and config are written beside it
    allocate: AllocateConfig = field(default_factory=AllocateConfig)


def run_allocate(cfg: AllocateRun, log=print) -> dict:
    """sensitivity.json + checkpoint -> policy JSON, ``<out>.png`` (bits per layer), ``<out>.config.yaml``."""
    out = Path(expand_path(cfg.out))
    ensure_writable_dir(out.parent)
    save_config(cfg, out.with_suffix(".config.yaml"))
    sens = read_json(expand_path(cfg.sensitivity), "sensitivity file")
    model, _, _, dcfg = load_float(cfg.checkpoint, cfg.config)
    policy = allocate(model, sens, cfg.allocate, dcfg.name)
    save_policy(policy, out)
    plot_bits({cfg.allocate.metric: policy}, out.with_suffix(".png"))
    s = policy["summary"]
    log(f"ILP {s['status']}: objective {s['objective']:.6g}, average bits {s['avg_w_bits']:.3f} (target "
        f"{s['target_bits']:g}, candidates {s['candidate_bits']}), solved in {s['solve_seconds'] * 1e3:.1f} ms; "
        f"{s['negative_traces_clamped']} negative trace(s) clamped")
    noise = s["noise"]
    if noise["draws"]:
        log(f"trace noise: {100 * noise['same_allocation']:.0f}% of {noise['draws']} re-solves with traces drawn from "
            f"their standard errors give the same allocation ({noise['mean_changed_layers']:.1f} layers change on "
            f"average)")
    return {"path": str(out), **s}


def ptq_result_path(cfg: PTQConfig) -> Path:
    """Where ``ptq`` writes its metrics: ``cfg.out``, else ``runs/ptq/<policy stem | uniform_wN>.ptq_result.json``.

    The file holds metrics, not a policy, so it never takes the policy's own path or that of any other policy
    file (``UserError``)."""
    name = Path(cfg.policy).stem if cfg.policy else f"uniform_w{cfg.w_bits}"
    out = Path(expand_path(cfg.out or f"runs/ptq/{name}.ptq_result.json"))
    if cfg.policy and out.resolve() == Path(expand_path(cfg.policy)).resolve():
        raise UserError(f"--out {str(out)!r} is the policy file itself; `detr-ptq ptq` writes metrics, not a policy: "
                        f"pass another path (default: runs/ptq/{name}.ptq_result.json)")
    if out.is_file():
        try:
            existing = json.loads(out.read_text())
        except (OSError, ValueError):
            existing = None
        if isinstance(existing, dict) and str(existing.get("format", "")).startswith("gmpq-policy"):
            raise UserError(f"--out {str(out)!r} holds a policy ({existing['format']}); `detr-ptq ptq` would overwrite "
                            f"it with metrics: pass another path")
    return out


def run_ptq(cfg: PTQConfig, log=print) -> dict:
    """checkpoint + policy (or uniform bits) -> COCO metrics ``<out>`` (default
    ``runs/ptq/<name>.ptq_result.json``) and ``<out stem>.config.yaml`` beside it."""
    torch.set_num_threads(cfg.num_threads)
    out = ptq_result_path(cfg)  # checked before the (long) evaluation
    min_size, max_size = checkpoint_resize(cfg.checkpoint, cfg.min_size, cfg.max_size)
    model, _, post, dcfg = load_float(cfg.checkpoint, cfg.config)
    if cfg.policy:
        policy, source = load_policy(expand_path(cfg.policy)), f"policy file {cfg.policy!r}"
    else:
        policy, source = uniform_detr_policy(model, dcfg.name, cfg.w_bits, cfg.exclude), f"uniform W{cfg.w_bits}"
    quantize_detr(model, policy, dcfg.name, source)
    loader, gt = eval_loader(cfg.coco_dir, cfg.split, min_size, max_size, cfg.batch_size, cfg.max_images)
    t0 = time.perf_counter()
    metrics = evaluate_detr(model, post, loader, gt, cfg.device)
    result = {"checkpoint": cfg.checkpoint, "policy": cfg.policy or None, "source": source, "split": cfg.split,
              "images": len(gt["images"]), "eval_seconds": round(time.perf_counter() - t0, 1), **metrics}
    atomic_write_json(out, result)
    save_config(cfg, out.with_suffix(".config.yaml"))
    log(json.dumps({k: result[k] for k in ("source", "images", "AP", "AP50")}))
    return {"path": str(out), **result}

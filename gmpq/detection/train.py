"""``finetune_det(cfg) -> result``: map a classification policy onto a detector's backbone, quantize, calibrate,
fine-tune (quantization-aware), evaluate with VOC mAP and COCO AP.

Outputs in ``cfg.out_dir``: ``config.yaml``, ``policy_detector.json`` (the policy in detector names),
``checkpoint.pt`` (each epoch, atomic; ``--resume``), ``model_final.pt`` (state dict + detector policy + config +
class names: the input of ``gmpq evaluate-det``), ``result.json``, ``log.jsonl`` and TensorBoard events in ``tb/``.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gmpq.config import config_to_dict, save_config
from gmpq.detection.config import DetFinetuneConfig
from gmpq.detection.data import training_targets
from gmpq.detection.datasets import build_datasets, make_loader
from gmpq.detection.detectors import build_detector, cost_input_size
from gmpq.detection.evaluate import evaluate_detector
from gmpq.detection.mapping import map_policy
from gmpq.errors import UserError
from gmpq.io import atomic_write_json, ensure_writable_dir
from gmpq.quant import apply_policy, calibrate, cost_summary, layer_bits, load_policy, save_policy
from gmpq.runtime import (
    DistInfo,
    RunLog,
    check_finite,
    init_distributed,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    set_seed,
)


def quantize_detector(model: nn.Module, policy: dict, cfg: DetFinetuneConfig, source: str) -> dict:
    """Map ``policy`` (source-classifier names) onto ``model`` and quantize it in place; returns the mapped policy."""
    det_policy = map_policy(policy, cfg.detector.name, model, cfg.rest_w_bits, cfg.rest_a_bits, source)
    apply_policy(model, det_policy, cfg.w_method, cfg.a_method, cfg.per_channel, source=source,
                 model_name=cfg.detector.name)
    return det_policy


def calibrate_detector(model: nn.Module, loader, num_batches: int, device: torch.device) -> dict:
    """Activation ranges from ``num_batches`` batches of images run through the whole detector (eval mode)."""
    return calibrate(model, (([im.to(device) for im in images],) for images, _ in loader), num_batches)


def backbone_costs(model: nn.Module, det_policy: dict, input_size) -> dict:
    """BOPs/size of the backbone (Faster R-CNN: ResNet + FPN; SSD: VGG + extra layers) per image at ``input_size``;
    ``mapped_*`` counts only the layers that came from the classification policy."""
    bits = {n.removeprefix("backbone."): b for n, b in layer_bits(det_policy, model).items()
            if n.startswith("backbone.")}
    s = cost_summary(model.backbone, bits, input_size)
    mapped = {n.removeprefix("backbone.") for n, e in det_policy["layers"].items() if "source_layer" in e}
    rows = [r for r in s["layers"] if r["name"] in mapped]
    return {"input_size": list(input_size), "backbone_bops_g": s["bops"] / 1e9,
            "backbone_float_bops_g": s["float_bops"] / 1e9, "backbone_macs_g": s["macs"] / 1e9,
            "backbone_size_mb": s["size_bytes"] / 1e6, "backbone_avg_w_bits": s["avg_w_bits"],
            "mapped_bops_g": sum(r["bops"] for r in rows) / 1e9,
            "mapped_float_bops_g": sum(r["macs"] for r in rows) * 32 * 32 / 1e9, "mapped_layers": len(rows)}


def _schedule(opt: torch.optim.Optimizer, cfg: DetFinetuneConfig, steps_per_epoch: int):
    """Per-iteration LR factor: linear warm-up from 0.001, then x gamma at each milestone epoch."""
    marks = sorted({max(1, round(f * cfg.epochs)) * steps_per_epoch for f in cfg.milestones})

    def factor(it: int) -> float:
        warm = 1.0 if it >= cfg.warmup_iters else 0.001 + (1 - 0.001) * it / cfg.warmup_iters
        return warm * cfg.gamma ** sum(it >= m for m in marks)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_epoch(net: nn.Module, loader, opt, sched, cfg: DetFinetuneConfig, info: DistInfo, log: RunLog, epoch: int,
                steps: int, ckpt) -> dict[str, float]:
    net.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    sums: dict[str, float] = {}
    t0 = time.time()
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and info.is_main))
    for step, (images, targets) in enumerate(bar):
        if step >= steps:
            break
        terms = net([im.to(info.device) for im in images], training_targets(targets, info.device))
        it = epoch * steps + step
        check_finite(terms, it, ckpt if ckpt.exists() else None)
        loss = sum(terms.values())  # torchvision's detection losses come weighted already: all weights are 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        values = {k: v.item() for k, v in terms.items()} | {"loss": loss.item()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{values['loss']:.3f}")
        log.scalars("train", values | {"lr": opt.param_groups[0]["lr"]}, it)
    n = max(min(steps, len(loader)), 1)
    return {k: v / n for k, v in sums.items()} | {"seconds_per_iter": (time.time() - t0) / n}


def finetune_det(cfg: DetFinetuneConfig, resume: bool = False) -> dict:
    """Run the detection fine-tuning described by ``cfg``; returns the dict also written to ``result.json``."""
    if not cfg.policy:
        raise UserError("finetune-det needs a policy: --policy FILE (a policy of the source classifier, e.g. from "
                        "`gmpq search` on resnet18 or vgg16, or `gmpq policy uniform`)")
    info = init_distributed(cfg.device)
    out = ensure_writable_dir(cfg.out_dir)
    set_seed(cfg.seed + info.rank)
    policy = load_policy(cfg.policy)
    train_ds, test_ds = build_datasets(cfg.data)
    if cfg.detector.frozen_bn is None:  # resolve now so model_final.pt rebuilds the same modules
        cfg = dataclasses.replace(cfg, detector=dataclasses.replace(
            cfg.detector, frozen_bn=cfg.detector.backbone_weights is not None))
    model = build_detector(cfg.detector, len(train_ds.class_names) + 1)
    det_policy = quantize_detector(model, policy, cfg, f"policy file {cfg.policy!r}")
    model.to(info.device)
    train_loader = make_loader(train_ds, cfg.data.batch_size, True, cfg.data.num_workers, info.distributed)
    test_loader = make_loader(test_ds, cfg.data.eval_batch_size, False, cfg.data.num_workers)
    steps = len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg, steps)
    ckpt = out / "checkpoint.pt"
    log = RunLog(out, enabled=info.is_main, tensorboard=cfg.tensorboard, resume=resume)
    start, before = 0, None
    if resume:
        state = restore_training(ckpt, model, opt, sched, info.device)
        start, before = state["epoch"], state["before"]
        log.truncate(start)
    else:
        calibrate_detector(model, train_loader, cfg.calib_batches, info.device)
        before = _evaluate(model, test_ds, test_loader, cfg, info) if cfg.eval_before else {}
    if info.is_main:
        save_config(cfg, out / "config.yaml")
        save_policy(det_policy, out / "policy_detector.json")
    net = DistributedDataParallel(model) if info.distributed else model
    metrics, train = before, {}
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        train = train_epoch(net, train_loader, opt, sched, cfg, info, log, epoch, steps, ckpt)
        last = epoch + 1 == cfg.epochs
        if last or (epoch + 1) % cfg.eval_every == 0:
            metrics = _evaluate(model, test_ds, test_loader, cfg, info)
        if info.is_main:
            save_checkpoint(ckpt, model=model.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), epoch=epoch + 1, before=before, metrics=metrics)
            log.epoch({"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}, **_scalars(metrics, "test_"),
                       "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0})
            log.scalars("test", {k: v for k, v in _scalars(metrics).items() if v is not None}, epoch)
    result = {"name": out.name, "detector": cfg.detector.name, "policy": cfg.policy,
              "method": policy["created_by"].get("method"), "data": cfg.data.format, "data_root": cfg.data.root,
              "epochs": cfg.epochs, "steps_per_epoch": steps, **_scalars(metrics),
              **_scalars(before, "before_finetune_"), "per_class": metrics.get("per_class"),
              "seconds_per_iter": train.get("seconds_per_iter"), "train_data": train_ds.stats,
              "test_data": test_ds.stats,
              **backbone_costs(model, det_policy, cost_input_size(cfg.detector))}
    if info.is_main:
        save_checkpoint(out / "model_final.pt", model=model.state_dict(), policy=det_policy,
                        config=config_to_dict(cfg), class_names=train_ds.class_names)
        atomic_write_json(out / "result.json", result)
    log.close()
    return result


def _evaluate(model, ds, loader, cfg: DetFinetuneConfig, info: DistInfo) -> dict:
    """Evaluation runs on the main process only (the others wait), on the whole test set."""
    metrics = evaluate_detector(model, ds, loader, info.device, cfg.progress) if info.is_main else {}
    if info.distributed:
        dist.barrier()
    return metrics


def _scalars(metrics: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}


def load_finetuned(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, DetFinetuneConfig, list[str]]:
    """Rebuild the quantized detector of a ``model_final.pt`` written by ``finetune_det``: (model, config, classes)."""
    from gmpq.config import load_config

    state = load_checkpoint(path, device)
    if not {"model", "policy", "config", "class_names"} <= set(state):
        raise UserError(f"checkpoint {path!r} is not a model_final.pt of `gmpq finetune-det` (it needs the keys "
                        f"model, policy, config, class_names; found {sorted(state)})")
    cfg = load_config(DetFinetuneConfig, base=state["config"])
    cfg = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, backbone_weights=None))
    model = build_detector(cfg.detector, len(state["class_names"]) + 1)
    apply_policy(model, state["policy"], cfg.w_method, cfg.a_method, cfg.per_channel, source=f"policy in {path!r}")
    model.load_state_dict(state["model"])
    return model.to(device), cfg, list(state["class_names"])

"""``finetune(cfg) -> result``: apply a policy, calibrate, quantization-aware fine-tuning, evaluate.

Outputs in ``cfg.out_dir``: ``config.yaml``, ``checkpoint.pt`` (each epoch, atomic; ``--resume``),
``model_final.pt`` (the quantized model's state dict + policy), ``result.json`` (accuracy and costs, the input
of ``gmpq report``), ``log.jsonl`` and TensorBoard events in ``tb/``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gmpq.config import config_to_dict, save_config
from gmpq.data import build_loaders
from gmpq.deploy.config import FinetuneConfig
from gmpq.deploy.datasets import extra_evaluations
from gmpq.deploy.evaluate import evaluate
from gmpq.errors import UserError
from gmpq.io import atomic_write_json, ensure_writable_dir
from gmpq.models import create_model, model_spec
from gmpq.quant import apply_policy, calibrate, cost_summary, layer_bits, load_policy
from gmpq.runtime import (
    DistInfo,
    RunLog,
    check_finite,
    init_distributed,
    restore_training,
    save_checkpoint,
    set_seed,
    shutdown_distributed,
)


def loss_terms(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
               temperature: float) -> dict[str, torch.Tensor]:
    """``{"ce"}`` and, with a teacher, ``{"kd"}`` = T^2 * KL(softmax(t/T) || softmax(s/T)). Logits ``[N, K]``."""
    terms = {"ce": nn.functional.cross_entropy(logits, y)}
    if teacher_logits is not None:
        t = temperature
        terms["kd"] = nn.functional.kl_div(nn.functional.log_softmax(logits / t, dim=1),
                                           nn.functional.log_softmax(teacher_logits / t, dim=1),
                                           reduction="batchmean", log_target=True) * t * t
    return terms


def quantized_result(model: nn.Module, bits: dict[str, tuple[int, int | None]], input_size) -> dict:
    """Costs of ``model`` at ``bits`` (``{layer: (w_bits, a_bits)}``) in report units (GBOPs, MB)."""
    s = cost_summary(model, bits, input_size)
    return {"bops_g": s["bops"] / 1e9, "size_mb": s["size_bytes"] / 1e6, "compression": s["compression"],
            "avg_w_bits": s["avg_w_bits"], "avg_a_bits": s["avg_a_bits"], "float_bops_g": s["float_bops"] / 1e9}


def _prepare(cfg: FinetuneConfig, info: DistInfo):
    if not cfg.policy:
        raise UserError("finetune needs a policy: --policy FILE (see `gmpq policy uniform|random` or `gmpq search`)")
    policy = load_policy(cfg.policy)
    spec = model_spec(cfg.model)
    model = create_model(cfg.model, cfg.num_classes, cfg.weights)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kd.enabled else None
    apply_policy(model, policy, cfg.w_method, cfg.a_method, cfg.per_channel,
                 source=f"policy file {cfg.policy!r}", model_name=cfg.model)
    return policy, spec, model.to(info.device), teacher.to(info.device) if teacher is not None else None


def _optimizer(model: nn.Module, cfg: FinetuneConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.milestones})
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, cfg.gamma)


def train_epoch(model, teacher, loader, opt, cfg: FinetuneConfig, info: DistInfo, log: RunLog, epoch: int,
                ckpt: Path) -> dict[str, float]:
    model.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # a different shard order each epoch under DDP
    sums: dict[str, float] = {}
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and info.is_main))
    for step, (x, y) in enumerate(bar):
        if step >= steps:
            break
        x, y = x.to(info.device), y.to(info.device)
        with torch.no_grad():
            t_logits = teacher(x) if teacher is not None else None
        terms = loss_terms(model(x), y, t_logits, cfg.kd.temperature)
        check_finite(terms, epoch * steps + step, ckpt if ckpt.exists() else None)
        loss = terms["ce"] + cfg.kd.weight * terms.get("kd", 0.0)  # the one place where weights are applied
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        values = {k: v.item() for k, v in terms.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log.scalars("train", values, epoch * steps + step)
    return {k: v / max(steps, 1) for k, v in sums.items()}


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Run the fine-tuning described by ``cfg``; returns the result dict also written to ``result.json``."""
    info = init_distributed(cfg.device)
    out = ensure_writable_dir(cfg.out_dir)  # fail now, not after an hour of training
    set_seed(cfg.seed + info.rank)
    policy, spec, model, teacher = _prepare(cfg, info)
    train_loader, test_loader = build_loaders(cfg.data, distributed=info.distributed)
    opt, sched = _optimizer(model, cfg)
    ckpt = out / "checkpoint.pt"
    log = RunLog(out, enabled=info.is_main, tensorboard=cfg.tensorboard, resume=resume)
    start, before = 0, None
    if resume:
        state = restore_training(ckpt, model, opt, sched, info.device)
        start, before = state["epoch"], state["before"]
        log.truncate(start)
    else:
        calibrate(model, train_loader, cfg.calib_batches, info.device)
        before = evaluate(model, test_loader, info.device, info)
    if info.is_main:
        save_config(cfg, out / "config.yaml")
    net = DistributedDataParallel(model) if info.distributed else model
    metrics = before
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        train = train_epoch(net, teacher, train_loader, opt, cfg, info, log, epoch, ckpt)
        sched.step()
        metrics = evaluate(model, test_loader, info.device, info)
        if info.is_main:
            save_checkpoint(ckpt, model=model.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), epoch=epoch + 1, before=before, metrics=metrics)
            log.epoch({"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
                       **{f"test_{k}": v for k, v in metrics.items()}, "lr": opt.param_groups[0]["lr"],
                       "seconds": time.time() - t0})
            log.scalars("test", metrics, epoch)
    result = {"name": out.name, "model": cfg.model, "policy": cfg.policy,
              "method": policy["created_by"].get("method"), "data": cfg.data.name, "epochs": cfg.epochs,
              "top1": metrics["top1"], "top5": metrics["top5"], "n_test": metrics["n"],
              "top1_before_finetune": before["top1"],
              **quantized_result(model, layer_bits(policy, model), spec.input_size)}
    if cfg.extra_eval:
        result.update(extra_evaluations(model, cfg.extra_eval, info.device, cfg.data.eval_batch_size))
    if info.is_main:
        save_checkpoint(out / "model_final.pt", model=model.state_dict(), policy=policy,
                        config=config_to_dict(cfg))
        atomic_write_json(out / "result.json", result)
    log.close()
    shutdown_distributed(info)
    return result

"""``finetune(cfg) -> result``: apply a policy, calibrate, quantization-aware fine-tuning, evaluate.

The epochs run on ``gmpq.runtime.fit`` (DDP under torchrun). Outputs in ``cfg.out_dir``: ``config.yaml``,
``checkpoint.pt`` (each epoch, atomic; ``--resume``), ``log.jsonl`` and TensorBoard events in ``tb/``; after the last
epoch, derived from the checkpoint (and re-derived by ``--resume``): ``model_final.pt`` (the quantized model's state
dict + policy) and ``result.json`` (accuracy and costs, the input of ``gmpq report``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from gmpq.config import config_to_dict, save_config
from gmpq.data import DataConfig, build_loaders, check_dataset_for_model
from gmpq.deploy.config import FinetuneConfig
from gmpq.deploy.datasets import extra_evaluations
from gmpq.deploy.evaluate import evaluate
from gmpq.errors import UserError
from gmpq.io import atomic_write_json, ensure_writable_dir
from gmpq.models import create_model, model_spec
from gmpq.quant import apply_policy, calibrate, cost_summary, layer_bits, load_policy
from gmpq.runtime import (
    DistInfo,
    Task,
    fit,
    init_distributed,
    load_resume,
    save_checkpoint,
    set_seed,
    shutdown_distributed,
)
from gmpq.runtime.modes import train_mode


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


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _step(teacher: nn.Module | None, cfg: FinetuneConfig, device: torch.device):
    """The engine's step: ``{"ce", "kd" (with a teacher), "acc" (logged only)}`` for one batch."""

    def terms(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch[0].to(device), batch[1].to(device)
        with torch.no_grad():
            t_logits = teacher(x) if teacher is not None else None
        logits = net(x)
        return loss_terms(logits, y, t_logits, cfg.kd.temperature) | {"acc": (logits.argmax(1) == y).float().mean()}

    return terms


def calibration_loader(data: DataConfig, info: DistInfo, train_loader):
    """Every process calibrates on the same global batches as a single process would (not on its own shard), so
    N processes start from the activation ranges of one."""
    if not info.distributed:
        return train_loader
    return build_loaders(dataclasses.replace(data, batch_size=data.batch_size * info.world_size))[0]


def _test(metrics: dict) -> dict:
    return {f"test_{k}": v for k, v in metrics.items()}


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Run the fine-tuning described by ``cfg``; returns the result dict also written to ``result.json``."""
    info = init_distributed(cfg.device)
    try:
        out = ensure_writable_dir(cfg.out_dir)  # fail now, not after an hour of training
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        set_seed(cfg.seed + info.rank)
        policy, spec, model, teacher = _prepare(cfg, info)
        train_loader, test_loader = build_loaders(cfg.data, distributed=info.distributed)
        for split, loader in (("train", train_loader), ("test", test_loader)):  # before any step: a clear error
            check_dataset_for_model(loader.dataset, spec, cfg.num_classes, f"data {cfg.data.name!r} ({split} split)")
        state = load_resume(out, info.device) if resume else None
        if state is None:
            calibrate(model, calibration_loader(cfg.data, info, train_loader), cfg.calib_batches, info.device,
                      progress=cfg.progress and info.is_main)
            before = _test(evaluate(model, test_loader, info.device, info, progress=cfg.progress))
        else:
            before = state["extra"]["before"]
        if info.is_main:
            save_config(cfg, out / "config.yaml")
        final: dict = {}

        def write_final(epoch: int, metrics: dict) -> None:
            """model_final.pt and result.json: derived from the checkpoint of the last epoch."""
            if epoch == cfg.epochs:
                final.update(_result(cfg, out, policy, spec, model, metrics, before, info))
                save_checkpoint(out / "model_final.pt", model=model.state_dict(), policy=policy,
                                config=config_to_dict(cfg))
                atomic_write_json(out / "result.json", final)

        task = Task(model=model, optimizer=_optimizer(model, cfg), loader=train_loader,
                    loss_terms=_step(teacher, cfg, info.device), weights={"ce": 1.0, "kd": cfg.kd.weight},
                    evaluate=lambda: _test(evaluate(model, test_loader, info.device, info, progress=cfg.progress)),
                    name="finetune", on_epoch_start=lambda epoch: train_mode(model, cfg.frozen_bn),
                    extra_state=lambda: {"before": before}, write_outputs=write_final)
        run = fit(task, cfg, info, state)
        if run.epoch == 0 and info.is_main:  # epochs=0: the calibrated model, not fine-tuned
            write_final(0, before)
        return final or _result(cfg, out, policy, spec, model, run.metrics if run.epoch else before, before, info)
    finally:
        shutdown_distributed(info)


def _result(cfg: FinetuneConfig, out: Path, policy: dict, spec, model: nn.Module, metrics: dict, before: dict,
            info: DistInfo) -> dict:
    result = {"name": out.name, "model": cfg.model, "policy": cfg.policy,
              "method": policy["created_by"].get("method"), "data": cfg.data.name, "epochs": cfg.epochs,
              "top1": metrics["test_top1"], "top5": metrics["test_top5"], "n_test": metrics["test_n"],
              "top1_before_finetune": before["test_top1"],
              **quantized_result(model, layer_bits(policy, model), spec.input_size)}
    if cfg.extra_eval:
        result.update(extra_evaluations(model, cfg.extra_eval, info.device, cfg.data.eval_batch_size))
    return result

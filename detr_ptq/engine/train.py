"""``train(cfg) -> metrics``: DETR's recipe (AdamW, separate backbone lr, weight decay 1e-4, gradient clipping
0.1, 10x lr drop at ``lr_drop``), atomic per-epoch checkpoints with ``--resume``, TensorBoard, a tqdm bar and a
stop on any non-finite loss term."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from detr_ptq.data.coco import CocoDetection, coco_paths
from detr_ptq.data.transforms import DetrTransform, collate
from detr_ptq.engine.evaluate import evaluate
from detr_ptq.models.build import DETRConfig, build_detr, get_preset
from detr_ptq.models.checkpoint import load_state_strict, read_state_dict, save_detr
from detr_ptq.models.criterion import weighted_total
from gmpq.config import save_config
from gmpq.detection.pycoco import format_metrics
from gmpq.errors import NonFiniteLossError, UserError
from gmpq.io import atomic_torch_save, atomic_write_json, ensure_writable_dir
from gmpq.paths import expand_path


@dataclass
class TrainConfig:
    data_dir: str = "runs/digits"  # COCO layout: annotations/instances_{split}.json + {split}/
    train_split: str = "train"
    val_split: str = "val"
    out_dir: str = "runs/detr_tiny_digits"
    model: DETRConfig = field(default_factory=lambda: get_preset("detr_tiny"))
    init_checkpoint: str = ""  # optional weights to start from (strict load)
    # Backbone pretraining on object crops (0 = off), the stand-in for an ImageNet-pretrained backbone
    # when the backbone starts from random weights; see engine/pretrain_backbone.py.
    backbone_pretrain_epochs: int = 0
    backbone_pretrain_lr: float = 1e-3
    backbone_pretrain_crop: int = 48  # pixels
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: int = 200  # epoch after which the lr drops 10x (official: 200 of 300)
    min_size: int = 800  # resize: shortest side, pixels
    max_size: int = 1333  # resize: longest side at most, pixels
    eval_every: int = 5  # epochs; the last epoch is always evaluated
    seed: int = 42
    num_threads: int = 1
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")


def _loaders(cfg: TrainConfig) -> tuple[DataLoader, DataLoader, dict]:
    root = expand_path(cfg.data_dir)
    transform = DetrTransform(cfg.min_size, cfg.max_size)
    tr_ann, tr_img, _ = coco_paths(root, cfg.train_split)
    va_ann, va_img, _ = coco_paths(root, cfg.val_split)
    train_set, val_set = CocoDetection(tr_img, tr_ann, transform), CocoDetection(va_img, va_ann, transform)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(train_set, cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen, drop_last=True)
    val = DataLoader(val_set, cfg.batch_size, shuffle=False, collate_fn=collate)
    return train, val, val_set.coco


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr}, {"params": backbone, "lr": cfg.lr_backbone}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_finite(loss_dict: dict, epoch: int, step: int, last_good: Path) -> None:
    for name, value in loss_dict.items():
        if not math.isfinite(float(value.detach())):
            raise NonFiniteLossError(f"loss term {name!r} is {float(value.detach())} at epoch {epoch} step {step}; "
                                     f"last good checkpoint: {last_good}")


def _pretrain(model: torch.nn.Module, cfg: TrainConfig, dataset: CocoDetection, out: Path) -> None:
    from detr_ptq.engine.pretrain_backbone import object_crops, pretrain_backbone

    crops, labels = object_crops(dataset, cfg.backbone_pretrain_crop + 8)
    body = model.backbone[0].body
    result = pretrain_backbone(body, model.backbone.num_channels, cfg.model.num_classes, crops, labels,
                               cfg.backbone_pretrain_epochs, cfg.backbone_pretrain_lr, shift=4, seed=cfg.seed,
                               progress=cfg.progress)
    atomic_write_json(out / "backbone_pretrain.json", {"crops": len(crops), **result})


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    out = ensure_writable_dir(expand_path(cfg.out_dir))
    save_config(cfg, out / "config.yaml")
    train_loader, val_loader, val_gt = _loaders(cfg)
    model, criterion, post = build_detr(cfg.model)
    if cfg.init_checkpoint:
        load_state_strict(model, read_state_dict(expand_path(cfg.init_checkpoint))[0], cfg.init_checkpoint)
    if cfg.backbone_pretrain_epochs > 0 and not resume:
        _pretrain(model, cfg, train_loader.dataset, out)
    model.to(cfg.device)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)
    ckpt_path, start_epoch, history = out / "checkpoint.pth", 0, []
    if resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint at {str(ckpt_path)!r}; run without --resume first")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        load_state_strict(model, state["model"], str(ckpt_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        # The config wins over the stored schedule, so a run can be extended (more epochs, a later lr drop);
        # resumed before the drop, it equals a fresh run with the new config.
        scheduler.step_size = cfg.lr_drop
        train_loader.generator.set_state(state["loader_rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        print(f"resumed from {ckpt_path} at epoch {start_epoch}")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"))
    step, metrics = start_epoch * len(train_loader), {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=not cfg.progress, mininterval=10)
        for images, mask, targets in bar:
            outputs = model(images.to(cfg.device), mask.to(cfg.device))
            loss_dict = criterion(outputs, [{k: v.to(cfg.device) if torch.is_tensor(v) else v
                                             for k, v in t.items()} for t in targets])
            loss = weighted_total(loss_dict, criterion.weight_dict)
            _check_finite({"total": loss, **loss_dict}, epoch, step, ckpt_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
            optimizer.step()
            if step % 50 == 0:
                writer.add_scalar("train/loss", loss.item(), step)
                for k in ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"):
                    writer.add_scalar(f"train/{k}", loss_dict[k].item(), step)
            bar.set_postfix(loss=f"{loss.item():.3f}", cls_err=f"{loss_dict['class_error'].item():.1f}")
            step += 1
        scheduler.step()
        row = {"epoch": epoch, "loss": loss.item(), "seconds": round(time.time() - t0, 1)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate(model, post["bbox"], val_loader, val_gt, cfg.device)
            row.update(metrics)
            for k, v in metrics.items():
                if v is not None:
                    writer.add_scalar(f"val/{k}", v, epoch)
            print(f"epoch {epoch}: loss {loss.item():.4f}  {format_metrics(metrics)}", flush=True)
        history.append(row)
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                           "loader_rng": train_loader.generator.get_state(),
                           "config": dataclasses.asdict(cfg.model)}, ckpt_path)
        atomic_write_json(out / "history.json", history)
    writer.close()
    save_detr(out / "final.pth", model, cfg.model, metrics=metrics, train_config=dataclasses.asdict(cfg))
    atomic_write_json(out / "metrics.json", {"split": cfg.val_split, **metrics})
    return metrics

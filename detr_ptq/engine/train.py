"""``train(cfg) -> metrics``: DETR's recipe (AdamW, separate backbone lr, weight decay 1e-4, gradient clipping
0.1, 10x lr drop at the ``milestones``) on the project's one training loop (``gmpq.runtime.fit``: checkpoints,
``--resume``, NaN stop, log.jsonl, TensorBoard, progress).

Outputs in ``out_dir``: ``config.yaml``, ``checkpoint.pt`` (every epoch), ``log.jsonl`` (one line per finished epoch,
numbered from 1), ``tb/``, ``backbone_pretrain/`` (its own engine run, when ``backbone_pretrain_epochs`` > 0) and
``backbone_pretrain.json``; after the last epoch ``final.pth`` (loadable by ``detr-ptq eval``) and
``metrics.json``, both derived from the checkpoint (``--resume`` of a finished run re-writes them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from detr_ptq.data.coco import CocoDetection, coco_paths
from detr_ptq.data.transforms import DetrTransform, collate
from detr_ptq.engine.evaluate import evaluate
from detr_ptq.models.build import DETRConfig, build_detr, get_preset
from detr_ptq.models.checkpoint import load_state_strict, read_state_dict, save_detr
from gmpq.config import save_config
from gmpq.io import atomic_write_json, ensure_writable_dir
from gmpq.paths import expand_path
from gmpq.runtime import (
    CHECKPOINT,
    DistInfo,
    RunConfig,
    Task,
    fit,
    init_distributed,
    load_resume,
    set_seed,
    shutdown_distributed,
)


@dataclass
class TrainConfig(RunConfig):
    """DETR training settings; the shared run settings (out_dir, epochs, seed, threads, device, grad_clip,
    milestones, gamma, warmup_iters, max_steps_per_epoch, eval_every, progress, tensorboard) come from
    ``RunConfig``, with DETR's defaults below."""

    out_dir: str = "runs/detr_tiny_digits"
    epochs: int = 50
    seed: int = 42
    threads: int | None = 1
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    grad_clip: float | None = 0.1
    eval_every: int = 5
    data_dir: str = "runs/digits"  # COCO layout: annotations/instances_{split}.json + {split}/
    train_split: str = "train"
    val_split: str = "val"
    model: DETRConfig = field(default_factory=lambda: get_preset("detr_tiny"))
    init_checkpoint: str = ""  # optional weights to start from (strict load)
    # Backbone pretraining on object crops (0 = off), the stand-in for an ImageNet-pretrained backbone
    # when the backbone starts from random weights; see engine/pretrain_backbone.py.
    backbone_pretrain_epochs: int = 0
    backbone_pretrain_lr: float = 1e-3
    backbone_pretrain_crop: int = 48  # pixels
    batch_size: int = 8
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    min_size: int = 800  # resize: shortest side, pixels
    max_size: int = 1333  # resize: longest side at most, pixels

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")


def _loaders(cfg: TrainConfig, info: DistInfo) -> tuple[DataLoader, DataLoader, dict]:
    root = expand_path(cfg.data_dir)
    transform = DetrTransform(cfg.min_size, cfg.max_size)
    tr_ann, tr_img, _ = coco_paths(root, cfg.train_split)
    va_ann, va_img, _ = coco_paths(root, cfg.val_split)
    train_set, val_set = CocoDetection(tr_img, tr_ann, transform), CocoDetection(va_img, va_ann, transform)
    if info.distributed:
        sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
        train = DataLoader(train_set, cfg.batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        train = DataLoader(train_set, cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen,
                           drop_last=True)
    val = DataLoader(val_set, cfg.batch_size, shuffle=False, collate_fn=collate)
    return train, val, val_set.coco


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr}, {"params": backbone, "lr": cfg.lr_backbone}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def coco_evaluator(model: nn.Module, postprocessor: nn.Module, loader: DataLoader, gt: dict, info: DistInfo,
                   show: bool):
    """``() -> COCO metrics`` on the main process ({} elsewhere), with progress lines (the evaluation is long)."""

    def run() -> dict:
        if not info.is_main:
            return {}
        return evaluate(model, postprocessor, loader, gt, info.device, progress=show)

    return run


def _pretrain(model: nn.Module, cfg: TrainConfig, dataset: CocoDetection, out: Path, info: DistInfo,
              resume: bool) -> None:
    """Backbone pretraining as its own engine run in ``out/backbone_pretrain`` (resumable on its own)."""
    from detr_ptq.engine.pretrain_backbone import object_crops, pretrain_task

    crops, labels = object_crops(dataset, cfg.backbone_pretrain_crop + 8)
    run = RunConfig(out_dir=str(out / "backbone_pretrain"), epochs=cfg.backbone_pretrain_epochs, seed=cfg.seed,
                    threads=cfg.threads, device=cfg.device, progress=cfg.progress, tensorboard=cfg.tensorboard)
    task = pretrain_task(model.backbone[0].body, model.backbone.num_channels, cfg.model.num_classes, crops, labels,
                         cfg.backbone_pretrain_lr, shift=4, seed=cfg.seed)
    task.model.to(info.device)
    state = load_resume(run.out_dir, info.device) if resume else None
    history = fit(task, run, info, state).history
    if info.is_main:
        atomic_write_json(out / "backbone_pretrain.json", {"crops": len(crops),
                                                           "train_accuracy": history[-1]["train_acc"]})


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train the DETR of ``cfg`` (``resume``: continue from ``out_dir/checkpoint.pt``, or from the backbone
    pretraining's checkpoint when the run stopped before its first DETR epoch). -> the last COCO metrics."""
    info = init_distributed(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = ensure_writable_dir(expand_path(cfg.out_dir))
    pretrain_ckpt = out / "backbone_pretrain" / CHECKPOINT
    resume_pretrain = resume and not (out / CHECKPOINT).exists() and pretrain_ckpt.exists()
    state = load_resume(out, info.device) if resume and not resume_pretrain else None
    set_seed(cfg.seed)
    train_loader, val_loader, val_gt = _loaders(cfg, info)
    model, criterion, post = build_detr(cfg.model)
    if cfg.init_checkpoint and state is None:
        load_state_strict(model, read_state_dict(expand_path(cfg.init_checkpoint))[0], cfg.init_checkpoint)
    if cfg.backbone_pretrain_epochs > 0 and state is None:
        _pretrain(model, cfg, train_loader.dataset, out, info, resume_pretrain)
    model.to(info.device)
    criterion.to(info.device)
    if info.is_main:
        save_config(cfg, out / "config.yaml")

    def loss_terms(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, mask, targets = batch
        return criterion(net(images.to(info.device), mask.to(info.device)), to_device(targets, info.device))

    def write_outputs(epoch: int, metrics: dict) -> None:
        if epoch >= cfg.epochs:
            save_detr(out / "final.pth", model, cfg.model, metrics=metrics, train_config=dataclasses.asdict(cfg))
            atomic_write_json(out / "metrics.json", {"split": cfg.val_split, **metrics})

    task = Task(model=model, optimizer=_optimizer(model, cfg), loader=train_loader, loss_terms=loss_terms,
                weights=dict(criterion.weight_dict), name="detr", on_epoch_start=lambda epoch: model.train(),
                evaluate=coco_evaluator(model, post["bbox"], val_loader, val_gt, info, cfg.progress),
                write_outputs=write_outputs)
    metrics = fit(task, cfg, info, state).metrics
    shutdown_distributed(info)
    return metrics

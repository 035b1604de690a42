"""Everything ``detr-ptq qat`` builds before its first step: data, the float model, the teacher, the student."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from detr_ptq.data.coco import CocoDetection, coco_paths
from detr_ptq.data.transforms import DetrTrainTransform, DetrTransform, collate
from detr_ptq.data.voc import VocDetection
from detr_ptq.models.build import DETRConfig
from detr_ptq.models.checkpoint import load_detr_with_file
from detr_ptq.ptq.calibset import checkpoint_resize
from detr_ptq.qat.config import QATConfig
from detr_ptq.qat.quantize import attention_bits, build_student, policy_from_file, uniform_qat_policy
from gmpq.errors import UserError
from gmpq.paths import expand_path
from gmpq.quant.policy import load_policy
from gmpq.runtime import DistInfo

# Teacher and student must agree on these for query matching and feature distillation.
TEACHER_FIELDS = ("hidden_dim", "num_queries", "dec_layers", "num_classes", "aux_loss")


@dataclass
class Data:
    train: DataLoader
    calib: DataLoader  # the same seeded order on every process, so calibration is identical under DDP
    val: DataLoader
    val_gt: dict
    min_size: int
    max_size: int


def build_data(cfg: QATConfig, info: DistInfo) -> Data:
    min_size, max_size = checkpoint_resize(cfg.checkpoint, cfg.min_size, cfg.max_size)
    transform = DetrTransform(min_size, max_size)
    # augment: DETR's flip / multi-scale / crop on the training split (calibration sees the same distribution)
    train_tf = DetrTrainTransform(min_size, max_size) if cfg.augment else transform
    train_set = detection_dataset(cfg.data_format, cfg.data_dir, cfg.train_split, train_tf)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = (DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
               if info.distributed else RandomSampler(train_set, generator=gen))
    train = DataLoader(train_set, cfg.batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
    calib = DataLoader(train_set, cfg.batch_size, shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(cfg.seed + 1))
    val_set = detection_dataset(cfg.data_format, cfg.data_dir, cfg.val_split, transform, cfg.eval_images)
    val = DataLoader(val_set, cfg.batch_size, shuffle=False, collate_fn=collate)
    return Data(train, calib, val, val_set.coco, min_size, max_size)


def detection_dataset(fmt: str, root: str, split: str, transform, max_images: int = 0) -> CocoDetection:
    """A COCO-layout folder (``annotations/instances_{split}.json`` + ``{split}/``) or a VOC year folder
    (``Annotations``, ``JPEGImages``, ``ImageSets/Main/{split}.txt``); ``max_images`` > 0 keeps the first ones
    (and restricts the ground truth used for evaluation to them)."""
    if fmt == "voc":
        dataset = VocDetection(expand_path(root), split, transform)
    else:
        ann, img_dir, _ = coco_paths(expand_path(root), split)
        dataset = CocoDetection(img_dir, ann, transform)
    return dataset.first(max_images)


def load_float_detr(path: str, config: str, what: str):
    """-> (model in eval mode, criterion, postprocessors, DETRConfig); refuses a QAT result (a quantized model
    would silently become the "full-precision" teacher or be quantized twice)."""
    model, criterion, post, dcfg, raw = load_detr_with_file(expand_path(path), config or None, verbose=False)
    if isinstance(raw.get("qat"), dict):
        raise UserError(f"{what} {path!r} is a `detr-ptq qat` result (quantized); {what} must be a "
                        f"full-precision DETR checkpoint")
    return model.eval(), criterion, post, dcfg


def check_teacher(teacher_cfg: DETRConfig, student_cfg: DETRConfig, path: str) -> None:
    diffs = [f"{k}: teacher {getattr(teacher_cfg, k)!r} vs student {getattr(student_cfg, k)!r}"
             for k in TEACHER_FIELDS if getattr(teacher_cfg, k) != getattr(student_cfg, k)]
    if diffs:
        raise UserError(f"teacher checkpoint {path!r} does not match the student for distillation: "
                        f"{'; '.join(diffs)}. Use a teacher of the same architecture (--set teacher=PATH) or "
                        f"turn distillation off (--set fqm=false)")


def load_teacher(cfg: QATConfig, student_cfg: DETRConfig, device: torch.device) -> nn.Module | None:
    """The frozen full-precision teacher (only when distilling)."""
    if not cfg.fqm:
        return None
    path = cfg.teacher or cfg.checkpoint
    teacher, _, _, tcfg = load_float_detr(path, cfg.config if not cfg.teacher else "", "teacher checkpoint")
    check_teacher(tcfg, student_cfg, path)
    return teacher.eval().requires_grad_(False).to(device)


def qat_policy(model: nn.Module, cfg: QATConfig, model_name: str, saved: Path | None = None) -> dict:
    """The policy of this run: ``saved`` (a resumed run's resolved policy), else the policy file (checked
    against the model), else the uniform settings."""
    if saved is not None:
        return load_policy(saved)
    if cfg.policy:
        return policy_from_file(str(expand_path(cfg.policy)), model, model_name, cfg)
    return uniform_qat_policy(model, model_name, cfg)


@dataclass
class Models:
    student: nn.Module
    criterion: nn.Module
    postprocessors: dict
    detr_config: DETRConfig
    teacher: nn.Module | None
    policy: dict


def build_models(cfg: QATConfig, info: DistInfo, saved_policy: Path | None = None,
                 before_quantization=None) -> Models:
    """Load the float model, call ``before_quantization(model)`` (e.g. to evaluate it), quantize it."""
    model, criterion, post, dcfg = load_float_detr(cfg.checkpoint, cfg.config, "checkpoint")
    model.to(info.device)
    criterion.to(info.device)
    if before_quantization is not None:
        before_quantization(model)
    policy = qat_policy(model, cfg, dcfg.name, saved_policy)
    build_student(model, policy, cfg, dcfg.name)
    teacher = load_teacher(cfg, dcfg, info.device)
    return Models(model.to(info.device), criterion, post, dcfg, teacher, policy)


def result_header(cfg: QATConfig) -> dict:
    """The settings a results table needs, from the config (``attn_bits`` resolved: 0 = the activation bits)."""
    keys = ("policy", "w_bits", "a_bits", "quantize", "align", "align_init", "fqm", "fqm_tau", "distill_weight",
            "two_stage", "epochs", "max_steps_per_epoch", "batch_size", "lr", "augment")
    values = dataclasses.asdict(cfg)
    return {**{k: values[k] for k in keys}, "attn_bits": attention_bits(cfg), "seed": values.get("seed")}

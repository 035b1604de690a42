"""``DETRConfig`` (a dataclass), its presets, and ``build_detr(cfg) -> (model, criterion, postprocessors)``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from detr_ptq.models.backbone import Backbone, Joiner
from detr_ptq.models.criterion import SetCriterion, make_weight_dict
from detr_ptq.models.detr import DETR
from detr_ptq.models.matcher import HungarianMatcher
from detr_ptq.models.position_encoding import PositionEmbeddingSine
from detr_ptq.models.transformer import Transformer
from gmpq.errors import UserError


@dataclass
class DETRConfig:
    """Architecture and loss settings. Defaults are the official DETR-R50 (COCO, 91 ids + no-object)."""

    name: str = "detr_r50"
    backbone: Literal["resnet50", "tiny_resnet"] = "resnet50"
    backbone_norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    backbone_widths: list[int] = field(default_factory=list)  # tiny_resnet stage widths
    train_stem: bool = False  # also train conv1/bn1/layer1 (needed when the backbone is trained from scratch)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    num_classes: int = 91  # largest category id + 1; the logits have num_classes + 1 entries (last = no object)
    aux_loss: bool = True
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden_dim % self.nheads != 0:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by nheads={self.nheads}")
        if self.hidden_dim % 2 != 0:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be even (sine embedding: half per axis)")
        if self.backbone == "tiny_resnet" and len(self.backbone_widths) != 4:
            raise ValueError(f"backbone_widths={self.backbone_widths} must list 4 stage widths for tiny_resnet")


DETR_PRESETS: dict[str, DETRConfig] = {
    "detr_r50": DETRConfig(),
    # Trained from scratch on the digits dataset (10 classes, ids 1..10): narrow backbone so the checkpoint
    # stays below 10 MB; no dropout because it trains for few epochs.
    "detr_tiny": DETRConfig(
        name="detr_tiny", backbone="tiny_resnet", backbone_norm="bn", backbone_widths=[16, 32, 64, 128],
        train_stem=True, hidden_dim=128, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=512,
        dropout=0.0, num_queries=20, num_classes=11,
    ),
}


def get_preset(name: str) -> DETRConfig:
    if name not in DETR_PRESETS:
        raise UserError(f"DETR config {name!r} is unknown; accepted: {sorted(DETR_PRESETS)}")
    return dataclasses.replace(DETR_PRESETS[name])


def config_from_dict(values: dict) -> DETRConfig:
    """Rebuild a config stored in a checkpoint; unknown keys fail with the accepted ones."""
    known = {f.name for f in dataclasses.fields(DETRConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"checkpoint config has unknown key(s) {unknown}; accepted: {sorted(known)}")
    try:
        return DETRConfig(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint config is invalid: {e}") from None


def build_detr(cfg: DETRConfig) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    from detr_ptq.models.postprocess import PostProcess

    backbone = Backbone(cfg.backbone, cfg.backbone_norm, tuple(cfg.backbone_widths), train_stem=cfg.train_stem)
    joiner = Joiner(backbone, PositionEmbeddingSine(cfg.hidden_dim // 2, normalize=True))
    transformer = Transformer(cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward,
                              cfg.dropout)
    model = DETR(joiner, transformer, cfg.num_classes, cfg.num_queries, aux_loss=cfg.aux_loss)
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou)
    num_aux = cfg.dec_layers - 1 if cfg.aux_loss else 0
    weights = make_weight_dict(cfg.ce_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef, num_aux)
    criterion = SetCriterion(cfg.num_classes, matcher, weights, eos_coef=cfg.eos_coef)
    return model, criterion, {"bbox": PostProcess()}

"""DETR's set criterion: Hungarian matching, then classification (CE with a down-weighted no-object class),
L1 and GIoU box losses, on the final decoder layer and on every auxiliary layer (keys suffixed ``_i``).

The criterion returns a dict of named, unweighted terms; ``weight_dict`` is applied in the one place where weighting
happens (``gmpq.runtime.terms.weighted_total``, called by the training engine).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from detr_ptq.models.matcher import HungarianMatcher, box_cxcywh_to_xyxy


def make_weight_dict(ce: float, bbox: float, giou: float, num_aux: int) -> dict[str, float]:
    base = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    out = dict(base)
    for i in range(num_aux):
        out.update({f"{k}_{i}": v for k, v in base.items()})
    return out


class SetCriterion(nn.Module):
    """forward(outputs, targets) -> {loss_ce, loss_bbox, loss_giou, class_error, cardinality_error, and
    loss_*_i for each auxiliary output}. ``targets``: [{labels [N] int64, boxes [N, 4] cxcywh normalized}]."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def _losses(self, outputs: dict, targets: list[dict], indices: list, num_boxes: float) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes[batch_idx, src_idx] = matched_labels
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)

        src_boxes = outputs["pred_boxes"][batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes.device)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou,
                "_matched_logits": logits[batch_idx, src_idx], "_matched_labels": matched_labels}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        num_boxes = _mean_num_boxes(targets)
        indices = self.matcher(outputs, targets)
        terms = self._losses(outputs, targets, indices, num_boxes)
        matched_logits, matched_labels = terms.pop("_matched_logits"), terms.pop("_matched_labels")
        with torch.no_grad():  # logged, not optimized
            if len(matched_labels):
                acc = (matched_logits.argmax(-1) == matched_labels).float().mean() * 100
            else:
                acc = torch.tensor(100.0)
            terms["class_error"] = 100 - acc
            n_pred = (outputs["pred_logits"].argmax(-1) != self.num_classes).sum(1).float()
            n_tgt = torch.tensor([float(len(t["labels"])) for t in targets], device=n_pred.device)
            terms["cardinality_error"] = F.l1_loss(n_pred, n_tgt)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_terms = self._losses(aux, targets, self.matcher(aux, targets), num_boxes)
            for k in ("loss_ce", "loss_bbox", "loss_giou"):
                terms[f"{k}_{i}"] = aux_terms[k]
        return terms


def _mean_num_boxes(targets: list[dict]) -> float:
    """Boxes per process, averaged over the processes of a distributed run (as official DETR does), at least 1:
    every process then normalises its box losses by the same count, so the averaged DDP gradient equals the
    gradient of one process on the global batch even when the processes see different numbers of boxes."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n /= dist.get_world_size()
    return max(float(n), 1.0)


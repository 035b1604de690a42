"""Hungarian matching between predictions and targets (DETR's ``HungarianMatcher``)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def match_cost(logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor, cost_class: float,
               cost_bbox: float, cost_giou: float) -> Tensor:
    """Pairwise cost of one image: logits [Q, K+1], boxes [Q, 4] cxcywh, tgt_labels [N], tgt_boxes [N, 4]
    -> [Q, N]. Class cost is -p(target class) (DETR's approximation of the log-likelihood)."""
    prob = logits.softmax(-1)
    c_class = -prob[:, tgt_labels]
    c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


class HungarianMatcher(nn.Module):
    """forward(outputs {pred_logits [B, Q, K+1], pred_boxes [B, Q, 4]}, targets [{labels [N], boxes [N, 4]}])
    -> list of (query indices [n], target indices [n]) int64, one pair per image, n = min(Q, N)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        indices = []
        for logits, boxes, tgt in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            if len(tgt["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = match_cost(logits.float(), boxes.float(), tgt["labels"], tgt["boxes"].float(),
                              self.cost_class, self.cost_bbox, self.cost_giou)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

"""Turn DETR outputs into scored boxes in pixels of the original image (DETR's ``PostProcess``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_ptq.models.matcher import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """forward(outputs, target_sizes [B, 2] = (height, width) of the original images) ->
    [{scores [Q], labels [Q], boxes [Q, 4] (x0, y0, x1, y1) in pixels}]; label = argmax over real classes."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        prob = outputs["pred_logits"].softmax(-1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"])
        h, w = target_sizes.unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], dim=1)[:, None, :].to(boxes.dtype)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]

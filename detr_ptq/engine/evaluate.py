"""Inference over a data loader and COCO evaluation of the detections."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from gmpq.detection.coco_eval import warn_detections
from gmpq.detection.pycoco import coco_evaluate
from gmpq.runtime.progress import progress as show_progress


def to_coco_detections(targets: list[dict], results: list[dict]) -> list[dict]:
    """PostProcess results (boxes x0, y0, x1, y1 pixels) -> COCO detections (bbox x, y, w, h)."""
    detections = []
    for target, res in zip(targets, results):
        boxes = res["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for s, lab, b in zip(res["scores"].tolist(), res["labels"].tolist(), boxes.tolist()):
            detections.append({"image_id": int(target["image_id"]), "category_id": int(lab),
                               "bbox": [round(v, 3) for v in b], "score": float(s)})
    return detections


@torch.no_grad()
def predict(model: nn.Module, postprocessor: nn.Module, loader: DataLoader, device: str = "cpu",
            progress: bool = False) -> list[dict]:
    """-> COCO detections ``{image_id, category_id, bbox [x, y, w, h] pixels of the original image, score}``,
    one per query (at most 100 per image, the COCO maxDets)."""
    model.eval()
    detections = []
    for images, mask, targets in show_progress(loader, desc="COCO evaluation", enabled=progress, unit="batch"):
        outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections += to_coco_detections(targets, postprocessor(outputs, sizes))
    return detections


def evaluate(model: nn.Module, postprocessor: nn.Module, loader: DataLoader, gt: dict, device: str = "cpu",
             progress: bool = False) -> dict[str, float | None]:
    """COCO box metrics (AP, AP50, AP75, APs, APm, APl) of ``model`` on the images of ``loader``."""
    detections = predict(model, postprocessor, loader, device, progress)
    warn_detections(gt, detections, len(loader.dataset))  # AP 0 from mismatched category ids is not silent
    return coco_evaluate(gt, detections)

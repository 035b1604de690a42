"""Run a detector over a test set and score it: VOC mAP@0.5 (11-point and all-point) and COCO-style AP."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gmpq.detection.coco_eval import coco_metrics
from gmpq.detection.data import DetectionDataset
from gmpq.detection.voc_eval import voc_evaluate
from gmpq.runtime.progress import progress as show_progress


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, progress: bool = False) -> dict[int, dict]:
    """``{image_id: {"boxes" [D, 4] xyxy pixels of the original image, "scores" [D], "labels" [D]}}`` (numpy)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for images, targets in show_progress(loader, desc="detection evaluation", enabled=progress, unit="batch"):
            dets = model([im.to(device) for im in images])
            for t, d in zip(targets, dets):
                out[int(t["image_id"])] = {k: d[k].detach().cpu().numpy() for k in ("boxes", "scores", "labels")}
    finally:
        model.train(was_training)
    return out


def detection_metrics(ds: DetectionDataset, predictions: dict[int, dict]) -> dict:
    """VOC and COCO metrics of ``predictions`` on the images of ``ds`` they cover (values in [0, 1])."""
    gt = {k: v for k, v in ds.ground_truth().items() if k in predictions}
    voc = voc_evaluate(predictions, gt, ds.class_names)
    coco = coco_metrics(ds, predictions)
    return {"mAP_07": voc["mAP_07"], "mAP": voc["mAP"], **{f"coco_{k}": v for k, v in coco.items()},
            "n_images": len(predictions), "n_boxes": int(sum(len(g["boxes"]) for g in gt.values())),
            "per_class": voc["per_class"]}


def evaluate_detector(model: nn.Module, ds: DetectionDataset, loader, device: torch.device,
                      progress: bool = False) -> dict:
    return detection_metrics(ds, predict(model, loader, device, progress))


def perturb_predictions(gt: dict[int, dict], shift: float, seed: int = 0) -> dict[int, dict]:
    """Ground truth as predictions (score 1, difficult boxes included), each box shifted by up to ``shift`` of its
    width/height at random: a known-answer input for the evaluators (``shift=0`` must give AP = 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for img, g in gt.items():
        b = np.asarray(g["boxes"], dtype=np.float64).reshape(-1, 4)
        wh = np.concatenate([b[:, 2:] - b[:, :2]] * 2, axis=1)
        out[img] = {"boxes": b + rng.uniform(-shift, shift, b.shape) * wh,
                    "scores": rng.uniform(0.5, 1.0, len(b)), "labels": np.asarray(g["labels"])}
    return out

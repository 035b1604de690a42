"""PASCAL VOC detection AP as pure functions: matching at IoU >= 0.5 with "difficult" boxes ignored, then AP from
the precision/recall curve by the VOC2007 11-point rule or the VOC2010+ all-point (area) rule.

Conventions (as the official VOC devkit ``VOCevaldet.m``):
- Detections of one class are sorted by score over the whole test set (stable, so ties keep image order).
- A detection is compared with EVERY ground-truth box of its class in its image and takes the one of highest IoU.
  IoU >= ``iou_threshold`` with a difficult box: ignored (neither TP nor FP). With a non-difficult box not yet
  matched: TP. Already matched (a duplicate detection): FP. Below the threshold: FP.
- Recall is over the non-difficult boxes; a class without any non-difficult box has no AP (``None``) and is left
  out of the mean.
- Boxes are continuous ``[x1, y1, x2, y2]`` pixels, area ``(x2 - x1) * (y2 - y1)``. The VOC readers turn the XML's
  1-based inclusive ``xmin..xmax`` into ``x1 = xmin - 1, x2 = xmax``, so areas and IoUs equal the devkit's "+1" ones.

``sampled_ap(rec, prec, 101)`` is COCO's interpolated AP; with COCO's matching it equals pycocotools' AP50 whenever
no detection overlaps two ground-truth boxes at IoU >= 0.5 (the tests check this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of ``[N, 4]`` and ``[M, 4]`` xyxy boxes (continuous coordinates)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def ap_all_points(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC2010+ AP: area under the precision envelope (precision made monotone from the right)."""
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def sampled_ap(rec: np.ndarray, prec: np.ndarray, points: int = 11) -> float:
    """Mean over ``points`` recall levels t = 0, 1/(points-1), .., 1 of max{precision at recall >= t} (0 if none).

    ``points=11`` is the VOC2007 definition; ``points=101`` is COCO's.
    """
    rec, prec = np.asarray(rec, dtype=np.float64), np.asarray(prec, dtype=np.float64)
    total = 0.0
    for t in np.linspace(0.0, 1.0, points):
        mask = rec >= t - 1e-12  # linspace rounding must not drop a point that reaches t exactly
        total += float(prec[mask].max()) if mask.any() else 0.0
    return total / points


@dataclass
class ClassResult:
    ap_07: float | None  # 11-point
    ap: float | None  # all-point
    n_pos: int  # non-difficult ground-truth boxes
    n_det: int
    tp: np.ndarray  # per detection in score order: 1 = true positive
    fp: np.ndarray  # 1 = false positive (ignored detections are 0 in both)
    recall: np.ndarray
    precision: np.ndarray


def match_class(det_image: Sequence[int], det_boxes: np.ndarray, det_scores: np.ndarray,
                gt: dict[int, tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5) -> tuple[np.ndarray, ...]:
    """Greedy VOC matching for ONE class.

    ``det_image[i]``, ``det_boxes[i]`` ``[D, 4]``, ``det_scores[i]``: the detections; ``gt[image] = (boxes [G, 4],
    difficult [G] bool)``. Returns ``(tp, fp, order)``, each ``[D]``, in descending score order (``order`` indexes the
    inputs).
    """
    order = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="mergesort")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    used = {img: np.zeros(len(b), dtype=bool) for img, (b, _) in gt.items()}
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    for rank, i in enumerate(order):
        img = det_image[i]
        boxes, difficult = gt.get(img, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        ious = box_iou(det_boxes[i:i + 1], boxes)[0]
        j = int(np.argmax(ious))
        if ious[j] < iou_threshold:
            fp[rank] = 1
        elif difficult[j]:
            pass  # a detection of a difficult object neither helps nor hurts
        elif not used[img][j]:
            tp[rank], used[img][j] = 1, True
        else:
            fp[rank] = 1  # duplicate detection of an already matched object
    return tp, fp, order


def evaluate_class(det_image: Sequence[int], det_boxes: np.ndarray, det_scores: np.ndarray,
                   gt: dict[int, tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5) -> ClassResult:
    """AP of one class (both definitions); see ``match_class`` for the arguments."""
    tp, fp, _ = match_class(det_image, det_boxes, det_scores, gt, iou_threshold)
    n_pos = int(sum(int((~np.asarray(d, dtype=bool)).sum()) for _, d in gt.values()))
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / n_pos if n_pos else np.zeros_like(ctp)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    ap07 = sampled_ap(recall, precision, 11) if n_pos else None
    ap = ap_all_points(recall, precision) if n_pos else None
    return ClassResult(ap07, ap, n_pos, len(tp), tp, fp, recall, precision)


def voc_evaluate(predictions: dict[int, dict[str, np.ndarray]], ground_truth: dict[int, dict[str, np.ndarray]],
                 class_names: Sequence[str], iou_threshold: float = 0.5) -> dict:
    """mAP over classes ``1..len(class_names)`` (label 0 is background).

    ``predictions[image] = {"boxes" [D, 4], "scores" [D], "labels" [D]}``;
    ``ground_truth[image] = {"boxes" [G, 4], "labels" [G], "difficult" [G] bool}``.
    Returns ``{"mAP_07", "mAP", "per_class": {name: {"ap_07", "ap", "n_pos", "n_det"}}}`` with APs in [0, 1].
    """
    per_class = {}
    for label, name in enumerate(class_names, start=1):
        gt = {}
        for img, g in ground_truth.items():
            m = np.asarray(g["labels"]) == label
            gt[img] = (np.asarray(g["boxes"], dtype=np.float64).reshape(-1, 4)[m],
                       np.asarray(g.get("difficult", np.zeros(len(m), dtype=bool)), dtype=bool)[m])
        det_image, det_boxes, det_scores = [], [], []
        for img in sorted(predictions):
            p = predictions[img]
            m = np.asarray(p["labels"]) == label
            det_image += [img] * int(m.sum())
            det_boxes.append(np.asarray(p["boxes"], dtype=np.float64).reshape(-1, 4)[m])
            det_scores.append(np.asarray(p["scores"], dtype=np.float64)[m])
        boxes = np.concatenate(det_boxes) if det_boxes else np.zeros((0, 4))
        scores = np.concatenate(det_scores) if det_scores else np.zeros(0)
        r = evaluate_class(det_image, boxes, scores, gt, iou_threshold)
        per_class[name] = {"ap_07": r.ap_07, "ap": r.ap, "n_pos": r.n_pos, "n_det": r.n_det}
    valid = [v for v in per_class.values() if v["ap"] is not None]
    return {
        "mAP_07": float(np.mean([v["ap_07"] for v in valid])) if valid else None,
        "mAP": float(np.mean([v["ap"] for v in valid])) if valid else None,
        "n_classes_evaluated": len(valid),
        "per_class": per_class,
    }

"""COCO-style AP (pycocotools) for any ``DetectionDataset``: COCO data is scored against its own json; VOC data
against a COCO dict built from its records, with ``difficult`` boxes as ``iscrowd = 1`` (pycocotools ignores
detections matched to them, as VOC ignores difficult objects; crowd matching uses intersection over the detection's
area, so this is close to, not identical with, the VOC rule).

The pycocotools call itself is ``gmpq.detection.pycoco.coco_evaluate`` (it copes with json without
``info``/``licenses`` and with empty detection lists).
"""

from __future__ import annotations

import warnings

import numpy as np

from gmpq.detection.data import DetectionDataset
from gmpq.detection.pycoco import coco_evaluate
from gmpq.errors import InputWarning


def coco_ground_truth(ds: DetectionDataset) -> tuple[dict, list[int]]:
    """-> (COCO dict, ``cat_ids`` where ``cat_ids[label - 1]`` is the category id of a label)."""
    if ds.extra.get("format") == "coco":
        return ds.extra["coco"], list(ds.extra["cat_ids"])
    images, anns = [], []
    for r in ds.records:
        images.append({"id": r.image_id, "width": r.width, "height": r.height, "file_name": r.path.name})
        for box, label, difficult in zip(r.boxes.tolist(), r.labels.tolist(), r.difficult.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": r.image_id, "category_id": int(label),
                         "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(difficult)})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(ds.class_names)]
    return {"images": images, "annotations": anns, "categories": cats}, [c["id"] for c in cats]


def to_coco_detections(predictions: dict[int, dict[str, np.ndarray]], cat_ids: list[int]) -> list[dict]:
    """``{image_id: {"boxes" [D, 4] xyxy, "scores" [D], "labels" [D]}}`` -> pycocotools result list (xywh)."""
    out = []
    for img, p in predictions.items():
        for (x1, y1, x2, y2), s, lab in zip(np.asarray(p["boxes"]).reshape(-1, 4).tolist(),
                                            np.asarray(p["scores"]).tolist(), np.asarray(p["labels"]).tolist()):
            out.append({"image_id": img, "category_id": cat_ids[int(lab) - 1], "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(s)})
    return out


def detection_warnings(gt: dict, detections: list[dict], n_images: int) -> list[str]:
    """Why an AP may be 0 for a reason other than a bad detector: no detections at all, or most detections with
    category ids that are not among the ground truth's (the checkpoint's classes do not match the dataset's ids)."""
    if not detections:
        return [f"the detector made no detections on {n_images} image(s): every AP is 0 (check the checkpoint, the "
                f"image size and the score threshold)"]
    known = {c["id"] for c in gt.get("categories", [])}
    used = [d["category_id"] for d in detections]
    foreign = sorted({c for c in used if c not in known})
    share = sum(c not in known for c in used) / len(used)
    if share <= 0.5:  # a few stray ids (an undertrained model on COCO's sparse 91-id scheme) are normal
        return []
    shown = foreign[:10] + (["..."] if len(foreign) > 10 else [])
    return [f"{100 * share:.0f}% of the detections have category ids {shown} that are not categories of the "
            f"ground truth (ids {sorted(known)[:10]}{'...' if len(known) > 10 else ''}); they can never match, so "
            f"AP is {'0' if share == 1 else 'lowered'}: the checkpoint's classes do not match the dataset's "
            f"category ids"]


def warn_detections(gt: dict, detections: list[dict], n_images: int) -> None:
    """``warnings.warn`` each of ``detection_warnings`` (the CLI prints them as ``PROG: warning: ...``)."""
    for message in detection_warnings(gt, detections, n_images):
        warnings.warn(message, InputWarning, stacklevel=3)


def coco_metrics(ds: DetectionDataset, predictions: dict[int, dict[str, np.ndarray]]) -> dict[str, float | None]:
    """``{AP, AP50, AP75, APs, APm, APl}`` over the images in ``predictions`` (COCO's 100 detections per image)."""
    gt, cat_ids = coco_ground_truth(ds)
    detections = to_coco_detections(predictions, cat_ids)
    warn_detections(gt, detections, len(predictions))
    return coco_evaluate(gt, detections, image_ids=sorted(predictions))

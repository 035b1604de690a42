"""COCO-style AP (pycocotools) for any ``DetectionDataset``: COCO data is scored against its own json; VOC data
against a COCO dict built from its records, with ``difficult`` boxes as ``iscrowd = 1`` (pycocotools ignores
detections matched to them, as VOC ignores difficult objects; crowd matching uses intersection over the detection's
area, so this is close to, not identical with, the VOC rule).

The pycocotools call itself is ``gmpq.detection.pycoco.coco_evaluate`` (it copes with json without
``info``/``licenses`` and with empty detection lists).
"""

from __future__ import annotations

import numpy as np

from gmpq.detection.data import DetectionDataset
from gmpq.detection.pycoco import coco_evaluate


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


def coco_metrics(ds: DetectionDataset, predictions: dict[int, dict[str, np.ndarray]]) -> dict[str, float | None]:
    """``{AP, AP50, AP75, APs, APm, APl}`` over the images in ``predictions`` (COCO's 100 detections per image)."""
    gt, cat_ids = coco_ground_truth(ds)
    return coco_evaluate(gt, to_coco_detections(predictions, cat_ids), image_ids=sorted(predictions))

"""COCO box evaluation through pycocotools, for ground truth given as a COCO dict (``info``/``licenses``
optional) and detections as a list of ``{image_id, category_id, bbox [x, y, w, h], score}``."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_evaluate(gt: dict, detections: list[dict], image_ids: list[int] | None = None) -> dict[str, float | None]:
    """-> {AP, AP50, AP75, APs, APm, APl} in [0, 1]; None where pycocotools reports -1 (no ground truth of that
    size). ``image_ids`` restricts evaluation to those images (default: all images in ``gt``)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = copy.copy(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not detections:
            return {k: 0.0 for k in METRIC_NAMES}
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats[:6], dtype=float)
    return {k: (None if v < 0 else float(v)) for k, v in zip(METRIC_NAMES, stats)}


def format_metrics(metrics: dict[str, float | None]) -> str:
    return "  ".join(f"{k} {'n/a' if metrics.get(k) is None else f'{metrics[k]:.4f}'}" for k in METRIC_NAMES)

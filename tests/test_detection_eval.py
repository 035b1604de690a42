"""VOC AP against hand-computed values; VOC matching + COCO's 101-point rule against pycocotools; coco_tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gmpq.detection.coco import load_coco
from gmpq.detection.coco_eval import coco_metrics
from gmpq.detection.data import DetectionDataset, DetRecord
from gmpq.detection.evaluate import detection_metrics, perturb_predictions
from gmpq.detection.voc_eval import ap_all_points, box_iou, evaluate_class, match_class, sampled_ap, voc_evaluate

A, B, C = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]


def test_box_iou_known_values():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 10, 20, 20]]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_hand_computed_ap_with_difficult_and_duplicates():
    # GT: A and B (normal), C (difficult). Detections by score: A (TP), A again (duplicate: FP), C (difficult:
    # ignored), nowhere (FP), B (TP). -> recall [.5 .5 .5 1], precision [1 .5 1/3 .5] over the counted ones.
    gt = {1: (np.array([A, B, C], float), np.array([False, False, True]))}
    boxes = np.array([A, [0.5, 0, 10.5, 10], C, [60, 60, 70, 70], B], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    r = evaluate_class([1] * 5, boxes, scores, gt)
    assert r.tp.tolist() == [1, 0, 0, 0, 1] and r.fp.tolist() == [0, 1, 0, 1, 0] and r.n_pos == 2
    # all-point: 0.5 * 1 (recall 0 -> .5 at precision 1) + 0.5 * 0.5 (recall .5 -> 1 at precision .5)
    assert r.ap == pytest.approx(0.75)
    # 11-point: t = 0, .1, .., .5 -> 1; t = .6, .., 1 -> .5
    assert r.ap_07 == pytest.approx((6 * 1 + 5 * 0.5) / 11)


def test_detection_order_and_voc_best_match_rule():
    # Two overlapping GT boxes; the second detection's best GT is the already matched one -> FP under the devkit
    # rule, even though it overlaps the other GT at IoU >= 0.5.
    g1, g2 = [0, 0, 10, 10], [2, 0, 12, 10]  # IoU 8/12
    gt = {7: (np.array([g1, g2], float), np.array([False, False]))}
    dets = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], float)  # second: IoU .82 with g1, .82 with g2 -> g1 first
    tp, fp, order = match_class([7, 7], dets, np.array([0.9, 0.8]), gt)
    assert order.tolist() == [0, 1] and tp.tolist() == [1, 0] and fp.tolist() == [0, 1]
    # scores decide the order, not the input order
    tp, fp, order = match_class([7, 7], dets[::-1], np.array([0.8, 0.9]), gt)
    assert order.tolist() == [1, 0] and tp.tolist() == [1, 0]


def test_ap_edge_cases():
    assert ap_all_points(np.array([1.0]), np.array([1.0])) == 1.0
    assert sampled_ap(np.array([1.0]), np.array([1.0]), 11) == 1.0
    assert sampled_ap(np.array([]), np.array([]), 11) == 0.0
    gt = {1: (np.array([A]), np.array([False]))}
    assert evaluate_class([], np.zeros((0, 4)), np.zeros(0), gt).ap == 0.0  # missed everything
    only_difficult = {1: (np.array([A]), np.array([True]))}
    r = evaluate_class([1], np.array([A], float), np.array([1.0]), only_difficult)
    assert r.ap is None and r.tp.sum() == 0 and r.fp.sum() == 0  # no AP without positives; detection ignored
    res = voc_evaluate({1: {"boxes": np.array([A]), "scores": np.array([1.0]), "labels": np.array([1])}},
                       {1: {"boxes": np.array([A]), "labels": np.array([1]), "difficult": np.array([False])}},
                       ["cat", "dog"])
    assert res["mAP"] == 1.0 and res["mAP_07"] == 1.0 and res["per_class"]["dog"]["ap"] is None
    assert res["n_classes_evaluated"] == 1


def _random_scene(seed: int, n_images: int = 6, n_classes: int = 3):
    """Disjoint GT boxes on a grid; detections: jittered GT, duplicates and random boxes, all scores distinct."""
    rng = np.random.default_rng(seed)
    records, preds = [], {}
    for img in range(1, n_images + 1):
        cells = rng.choice(16, size=int(rng.integers(2, 7)), replace=False)
        boxes = np.array([[c % 4 * 50 + 5, c // 4 * 50 + 5, c % 4 * 50 + 5 + rng.uniform(15, 40),
                           c // 4 * 50 + 5 + rng.uniform(15, 40)] for c in cells])
        labels = rng.integers(1, n_classes + 1, len(boxes))
        records.append(DetRecord(img, Path(f"{img}.jpg"), 200, 200, boxes.astype(np.float32), labels,
                                 np.zeros(len(boxes), dtype=bool)))
        keep = rng.random(len(boxes)) < 0.8
        det = boxes[keep] + rng.normal(0, 3, (int(keep.sum()), 4))
        lab = labels[keep].copy()
        lab[rng.random(len(lab)) < 0.1] = rng.integers(1, n_classes + 1)  # some wrong labels
        dup = det[: max(1, len(det) // 3)] + rng.normal(0, 2, (max(1, len(det) // 3), 4))
        noise = rng.uniform(0, 150, (3, 2))
        noise = np.concatenate([noise, noise + rng.uniform(10, 40, (3, 2))], axis=1)
        all_boxes = np.concatenate([det, dup, noise])
        all_labels = np.concatenate([lab, lab[: len(dup)], rng.integers(1, n_classes + 1, 3)])
        preds[img] = {"boxes": all_boxes, "labels": all_labels, "scores": rng.random(len(all_boxes))}
    return DetectionDataset(records, [f"c{i}" for i in range(1, n_classes + 1)]), preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_matching_with_101_points_equals_pycocotools_ap50(seed):
    ds, preds = _random_scene(seed)
    gt = ds.ground_truth()
    aps = []
    for label in range(1, 4):
        g = {i: (v["boxes"][v["labels"] == label], v["difficult"][v["labels"] == label]) for i, v in gt.items()}
        imgs, boxes, scores = [], [], []
        for i, p in preds.items():
            m = p["labels"] == label
            imgs += [i] * int(m.sum())
            boxes.append(p["boxes"][m])
            scores.append(p["scores"][m])
        r = evaluate_class(imgs, np.concatenate(boxes), np.concatenate(scores), g)
        if r.n_pos:
            aps.append(sampled_ap(r.recall, r.precision, 101))
    coco = coco_metrics(ds, preds)
    assert 0.2 < coco["AP50"] < 1.0  # a non-trivial case
    assert np.mean(aps) == pytest.approx(coco["AP50"], abs=1e-9)


def test_perfect_and_perturbed_predictions_on_a_scene():
    ds, _ = _random_scene(3)
    m = detection_metrics(ds, perturb_predictions(ds.ground_truth(), 0.0))
    assert m["mAP"] == m["mAP_07"] == m["coco_AP"] == 1.0
    worse = detection_metrics(ds, perturb_predictions(ds.ground_truth(), 0.4))
    assert worse["mAP"] < 1.0 and worse["coco_AP"] < 1.0


@pytest.mark.shared_data
def test_coco_tiny_loads_completely_and_scores_ground_truth_perfectly(shared_data):
    ds = load_coco(shared_data / "coco_tiny", "val2017")
    assert len(ds) == 80 and ds.num_boxes() == 815 and len(ds.class_names) == 80
    assert ds.stats.get("boxes_zero_area", 0) == ds.stats.get("boxes_outside", 0) == 0
    x, t = ds[0]
    assert x.shape[0] == 3 and t["boxes"].shape[1] == 4
    perfect = detection_metrics(ds, perturb_predictions(ds.ground_truth(), 0.0))
    assert perfect["coco_AP"] == 1.0 and perfect["mAP"] == 1.0 and perfect["mAP_07"] == 1.0
    assert perfect["n_images"] == 80 and perfect["n_boxes"] == 815
    perturbed = detection_metrics(ds, perturb_predictions(ds.ground_truth(), 0.15, seed=1))
    assert perturbed["coco_AP"] < 0.9 and perturbed["coco_AP75"] < 1.0
    assert perturbed["mAP"] <= 1.0
    far = detection_metrics(ds, perturb_predictions(ds.ground_truth(), 0.5, seed=1))
    assert far["mAP"] < perfect["mAP"] and far["coco_AP50"] < 1.0

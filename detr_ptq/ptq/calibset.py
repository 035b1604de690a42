"""The calibration set: N images from a COCO-format folder, chosen so their class distribution approximates the
folder's (the paper samples calibration images with the training set's class distribution).

Selection is greedy and seeded: starting from nothing, add the image (from a random pool of candidates) that
brings the selected images' box-class histogram closest, in total variation, to the folder's. A random sample of
100 COCO images can miss rare classes entirely; the greedy choice keeps every frequent class represented.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from detr_ptq.data.coco import CocoDetection, coco_paths
from detr_ptq.data.transforms import DetrTransform, collate
from gmpq.errors import UserError
from gmpq.paths import expand_path


@dataclass
class CalibConfig:
    data_dir: str = "runs/digits"  # COCO layout: annotations/instances_{split}.json + {split}/
    split: str = "train"
    num_images: int = 100
    batch_size: int = 4  # micro-batch of one Hessian-vector product
    pool: int = 2000  # candidates examined per greedy step (all images when the folder is smaller)
    seed: int = 0
    min_size: int = 0  # resize (pixels); 0 = the checkpoint's training resize, else 800
    max_size: int = 0

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.batch_size < 1:
            raise ValueError(f"num_images={self.num_images} and batch_size={self.batch_size} must be >= 1")


def class_histograms(coco: dict) -> tuple[list[int], np.ndarray, list[int]]:
    """-> (image ids sorted, counts [num_images, num_categories] of non-crowd boxes, category ids)."""
    cat_ids = sorted(c["id"] for c in coco["categories"])
    col = {c: i for i, c in enumerate(cat_ids)}
    img_ids = sorted(im["id"] for im in coco["images"])
    row = {i: k for k, i in enumerate(img_ids)}
    counts = np.zeros((len(img_ids), len(cat_ids)), dtype=np.float64)
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0) and a["image_id"] in row and a["category_id"] in col:
            counts[row[a["image_id"]], col[a["category_id"]]] += 1
    return img_ids, counts, cat_ids


def total_variation(counts: np.ndarray, target: np.ndarray) -> float:
    """TV distance between the normalized histogram ``counts`` [C] and the distribution ``target`` [C]."""
    s = counts.sum()
    return 0.5 * float(np.abs(counts / s - target).sum()) if s > 0 else 1.0


def select_balanced(counts: np.ndarray, n: int, seed: int, pool: int = 2000) -> list[int]:
    """Greedy: indices of ``n`` rows of ``counts`` [num_images, C] whose summed histogram approximates the
    distribution of ``counts.sum(0)``. Images without boxes are used only when nothing else is left."""
    rng = np.random.default_rng(seed)
    total = counts.sum(0)
    target = total / total.sum() if total.sum() > 0 else np.full(len(total), 1.0 / max(len(total), 1))
    order = rng.permutation(len(counts))
    remaining = [i for i in order if counts[i].sum() > 0] + [i for i in order if counts[i].sum() == 0]
    chosen: list[int] = []
    acc = np.zeros(counts.shape[1])
    while len(chosen) < n and remaining:
        cand = np.asarray(remaining[:pool])
        hist = acc[None, :] + counts[cand]
        sums = hist.sum(1, keepdims=True)
        tv = 0.5 * np.abs(hist / np.where(sums > 0, sums, 1) - target).sum(1)
        tv[sums[:, 0] == 0] = np.inf
        best = int(cand[int(np.argmin(tv))]) if np.isfinite(tv).any() else int(cand[0])
        chosen.append(best)
        remaining.remove(best)
        acc += counts[best]
    return chosen


def calibration_loader(cfg: CalibConfig, min_size: int, max_size: int) -> tuple[DataLoader, dict]:
    """-> (loader of micro-batches ``(images, mask, targets)``, report dict). Warns and uses what exists when the
    folder holds fewer than ``num_images`` images."""
    root = expand_path(cfg.data_dir)
    if not root.is_dir():
        raise UserError(f"calibration folder {str(root)!r} does not exist; pass a COCO-layout folder with "
                        f"annotations/instances_{cfg.split}.json and {cfg.split}/ (e.g. from "
                        f"`detr-ptq make-digits-coco`)")
    ann, img_dir, split = coco_paths(root, cfg.split)
    dataset = CocoDetection(img_dir, ann, DetrTransform(min_size, max_size))
    n = cfg.num_images
    if len(dataset) < n:
        warnings.warn(f"calibration folder {str(root)!r} split {split!r} has {len(dataset)} images, fewer than "
                      f"num_images={n}; using all {len(dataset)}", stacklevel=2)
        n = len(dataset)
    if n == 0:
        raise UserError(f"calibration folder {str(root)!r} split {split!r} has no images")
    img_ids, counts, _ = class_histograms(dataset.coco)
    picked = select_balanced(counts, n, cfg.seed, cfg.pool)
    index = {img["id"]: k for k, img in enumerate(dataset.images)}
    subset = Subset(dataset, [index[img_ids[i]] for i in picked])
    target = counts.sum(0) / max(counts.sum(), 1)
    rand = np.random.default_rng(cfg.seed).choice(len(counts), n, replace=False)
    report = {"folder": str(root), "split": split, "annotations": str(ann), "available": len(dataset),
              "requested": cfg.num_images, "used": n, "image_ids": [img_ids[i] for i in picked],
              "tv_to_folder": total_variation(counts[picked].sum(0), target),
              "tv_random_sample": total_variation(counts[rand].sum(0), target)}
    loader = DataLoader(subset, cfg.batch_size, shuffle=False, collate_fn=collate)
    return loader, report


def load_batches(loader: DataLoader, device: str | torch.device = "cpu") -> list[tuple]:
    """Materialize the (small) calibration set once: every probe revisits the same micro-batches."""
    out = []
    for images, mask, targets in loader:
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        out.append((images.to(device), mask.to(device), targets))
    return out


def checkpoint_resize(checkpoint: str | Path, min_size: int = 0, max_size: int = 0) -> tuple[int, int]:
    """Image resize for a checkpoint: explicit values, else its ``train_config`` (the digits detector trains at
    its canvas size), else the official DETR 800/1333."""
    from detr_ptq.models.checkpoint import read_state_dict  # names a missing or unreadable file

    _, _, raw = read_state_dict(expand_path(checkpoint))
    train_cfg = raw.get("train_config", {}) if isinstance(raw, dict) else {}
    return (min_size or train_cfg.get("min_size", 800)), (max_size or train_cfg.get("max_size", 1333))

"""Detection samples shared by the VOC and COCO readers: one ``DetRecord`` per image, box cleaning with counts, the
dataset that decodes images, and the collate function.

A dataset item is ``(image [3, H, W] float in [0, 1], target)`` with ``target = {"boxes" [N, 4] float32 xyxy pixels,
"labels" [N] int64 in 1..K (0 is background), "difficult" [N] bool, "image_id" int}``. The detectors resize and
normalise internally, so images keep their own size here.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from gmpq.errors import UserError
from gmpq.io import load_image


@dataclasses.dataclass
class DetRecord:
    """One annotated image: ``boxes`` ``[N, 4]`` float32 xyxy pixels, ``labels`` ``[N]`` int64, ``difficult`` bool."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def clean_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Clip ``[N, 4]`` xyxy boxes to the image; drop degenerate ones.

    Returns ``(clipped boxes [N, 4], keep mask [N], counts)``; counts has ``zero_area`` (x2 <= x1 or y2 <= y1 as
    given), ``outside`` (nothing left inside the image) and ``clipped`` (kept, but cut at the image border).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    counts: Counter = Counter()
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    outside = ~degenerate & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    changed = ~degenerate & ~outside & np.any(clipped != boxes, axis=1)
    counts["zero_area"] += int(degenerate.sum())
    counts["outside"] += int(outside.sum())
    counts["clipped"] += int(changed.sum())
    return clipped.astype(np.float32), ~(degenerate | outside), counts


def warn_counts(counts: Counter, source: str, examples: list[str]) -> None:
    """One warning that says how many boxes were skipped or clipped, and where (a few examples)."""
    skipped = counts["zero_area"] + counts["outside"]
    if skipped or counts["clipped"]:
        where = f" (e.g. {', '.join(examples[:5])})" if examples else ""
        warnings.warn(f"{source}: skipped {skipped} box(es) ({counts['zero_area']} with zero area, "
                      f"{counts['outside']} outside the image) and clipped {counts['clipped']} to the image "
                      f"border{where}", stacklevel=3)



def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise UserError(f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"image {str(path)!r} cannot be decoded ({type(e).__name__}: {e})") from None


class DetectionDataset(Dataset):
    """Images of ``records`` with their targets; ``flip=True`` mirrors half of them at random (training)."""

    def __init__(self, records: list[DetRecord], class_names: list[str], flip: bool = False,
                 stats: dict | None = None, extra: dict | None = None):
        self.records, self.class_names, self.flip = records, list(class_names), flip
        self.stats = dict(stats or {})  # counts of skipped/clipped boxes etc., reported in result.json
        self.extra = dict(extra or {})  # reader-specific data (e.g. the COCO json for pycocotools)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        r = self.records[i]
        img = load_image(r.path)
        if img.size != (r.width, r.height):
            raise UserError(f"image {str(r.path)!r} is {img.size[0]}x{img.size[1]} pixels but its annotation says "
                            f"{r.width}x{r.height}; fix the annotation's size")
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        boxes = torch.from_numpy(r.boxes.copy())
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
            boxes = torch.stack([r.width - boxes[:, 2], boxes[:, 1], r.width - boxes[:, 0], boxes[:, 3]], dim=1)
        return x, {"boxes": boxes.reshape(-1, 4), "labels": torch.from_numpy(r.labels.copy()),
                   "difficult": torch.from_numpy(r.difficult.copy()), "image_id": r.image_id}

    def ground_truth(self) -> dict[int, dict[str, np.ndarray]]:
        """``{image_id: {"boxes", "labels", "difficult"}}`` for ``voc_evaluate``."""
        return {r.image_id: {"boxes": r.boxes, "labels": r.labels, "difficult": r.difficult} for r in self.records}

    def num_boxes(self) -> int:
        return int(sum(len(r.boxes) for r in self.records))


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Detectors take lists: images of different sizes are not stacked."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def training_targets(targets: list[dict], device: torch.device) -> list[dict]:
    """What the detectors train on: non-difficult (non-crowd) boxes and their labels, on ``device``."""
    out = []
    for t in targets:
        keep = ~t["difficult"]
        out.append({"boxes": t["boxes"][keep].to(device), "labels": t["labels"][keep].to(device)})
    return out

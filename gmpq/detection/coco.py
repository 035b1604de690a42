"""COCO-format detection data: ``ROOT/annotations/instances_SPLIT.json`` plus images in ``ROOT/SPLIT/``.

Labels are ``1 + index`` of the category in id order (so 80 COCO categories -> labels 1..80); the dataset keeps the
json (``extra["coco"]``) and the label -> category id table (``extra["cat_ids"]``) for pycocotools. Crowd boxes are
kept with ``difficult = True``: ignored by both evaluators and left out of the training targets. ``info`` and
``licenses`` keys are optional.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from gmpq.detection.data import DetectionDataset, DetRecord, clean_boxes, image_size, warn_counts
from gmpq.errors import UserError
from gmpq.io import read_json


def coco_split_paths(root: Path, split: str) -> tuple[Path, Path]:
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        found = sorted(p.stem.removeprefix("instances_") for p in (root / "annotations").glob("instances_*.json"))
        raise UserError(f"COCO split {split!r}: annotation file {str(ann)!r} does not exist; splits found under "
                        f"{str(root)!r}: {found}")
    return ann, root / split


def read_coco_json(path: Path) -> dict:
    data = read_json(path, "COCO annotation file")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict)
               or not isinstance(data.get(k), list)]
    if missing:
        raise UserError(f"COCO annotation file {str(path)!r} lacks the list(s) {missing}; a COCO instances file "
                        "has lists 'images', 'annotations' and 'categories'")
    return data


def load_coco(root: str | Path, split: str, flip: bool = False, max_images: int | None = None) -> DetectionDataset:
    """Read ``split`` of the COCO-format folder ``root``. Unknown image/category ids and missing image files raise
    one ``UserError``; degenerate and out-of-image boxes are skipped (or clipped), counted and warned about."""
    root = Path(root)
    ann_path, img_dir = coco_split_paths(root, split)
    data = read_coco_json(ann_path)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
    images = data["images"][:max_images] if max_images is not None else data["images"]
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in data["images"]}
    bad_image, bad_cat = [], Counter()
    for k, a in enumerate(data["annotations"]):
        if a.get("image_id") not in by_image:
            bad_image.append(f"annotations[{k}].image_id={a.get('image_id')!r}")
        elif a.get("category_id") not in label_of:
            bad_cat[a.get("category_id")] += 1
        else:
            by_image[a["image_id"]].append(a)
    missing = [str(img_dir / im["file_name"]) for im in images if not (img_dir / im["file_name"]).is_file()]
    problems = []
    if bad_image:
        problems.append(f"{len(bad_image)} annotation(s) name an image id not in 'images': {bad_image[:10]}")
    if bad_cat:
        problems.append(f"annotations with category ids not in 'categories' (id: count): {dict(bad_cat)}; "
                        f"accepted ids: {sorted(label_of)}")
    if missing:
        problems.append(f"{len(missing)} image file(s) do not exist: {missing[:10]}")
    if problems:
        raise UserError(f"COCO data {str(ann_path)!r}:\n  - " + "\n  - ".join(problems))
    records, counts, examples = [], Counter(), []
    for im in images:
        path = img_dir / im["file_name"]
        w, h = (im["width"], im["height"]) if im.get("width") and im.get("height") else image_size(path)
        anns = by_image[im["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes, keep, c = clean_boxes(boxes, w, h)
        if c["zero_area"] + c["outside"] + c["clipped"]:
            examples.append(str(im["file_name"]))
        counts += c
        labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        records.append(DetRecord(int(im["id"]), path, int(w), int(h), boxes[keep], labels[keep], crowd[keep]))
    if not records:
        raise UserError(f"COCO data {str(ann_path)!r} holds no images")
    warn_counts(counts, f"COCO data {str(ann_path)!r}", examples)
    stats = {"images": len(records), "boxes": int(sum(len(r.boxes) for r in records)),
             "crowd": int(sum(r.difficult.sum() for r in records)), **{f"boxes_{k}": v for k, v in counts.items()}}
    extra = {"format": "coco", "coco": data, "cat_ids": [c["id"] for c in cats], "split": split}
    return DetectionDataset(records, [str(c.get("name", c["id"])) for c in cats], flip, stats, extra)

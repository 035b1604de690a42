"""COCO-format detection data: a validating json reader and a dataset yielding DETR targets.

Labels are the category ids themselves (as the official DETR: 91 COCO ids -> ``num_classes = 91``).
The json files need ``images``, ``annotations`` and ``categories``; ``info`` and ``licenses`` are optional.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from gmpq.errors import UserError
from gmpq.io import load_image, read_json

REQUIRED_IMAGE_KEYS = ("id", "file_name")
REQUIRED_ANN_KEYS = ("image_id", "bbox", "category_id")


def load_coco_json(path: str | Path) -> dict:
    """Read and validate a COCO instances file; missing ``info``/``licenses`` are filled with empty values."""
    data = read_json(path, "annotation file")
    where = f"annotation file {str(path)!r}"
    if not isinstance(data, dict):
        raise UserError(f"{where} is not COCO format: expected an object with keys "
                        f"['images', 'annotations', 'categories'], got a {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise UserError(f"{where} is not COCO format: missing or non-list key(s) {missing}; "
                        f"a COCO file has lists 'images', 'annotations', 'categories'")
    for kind, items, keys in (("images", data["images"], REQUIRED_IMAGE_KEYS),
                              ("annotations", data["annotations"], REQUIRED_ANN_KEYS),
                              ("categories", data["categories"], ("id",))):
        for i, item in enumerate(items):
            lacking = [k for k in keys if not isinstance(item, dict) or k not in item]
            if lacking:
                raise UserError(f"{where} is not COCO format: {kind}[{i}] lacks {lacking}; "
                                f"each entry of {kind!r} needs {list(keys)}")
    for i, ann in enumerate(data["annotations"]):
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise UserError(f"{where}: annotations[{i}].bbox={box!r} should be [x, y, width, height]")
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    return data


def coco_paths(coco_dir: str | Path, split: str | None = None) -> tuple[Path, Path, str]:
    """``coco_dir/annotations/instances_{split}.json`` and ``coco_dir/{split}/``. Without ``split``, use
    ``val2017`` (COCO) or ``val`` (the digits dataset), whichever exists."""
    root = Path(coco_dir)
    ann_dir = root / "annotations"
    candidates = [split] if split else ["val2017", "val"]
    for s in candidates:
        if (ann_dir / f"instances_{s}.json").is_file():
            return ann_dir / f"instances_{s}.json", root / s, s
    found = sorted(p.name for p in ann_dir.glob("instances_*.json")) if ann_dir.is_dir() else []
    raise UserError(f"COCO folder {str(root)!r} has no annotations/instances_{{{','.join(candidates)}}}.json; "
                    f"found {found}; pass --split NAME for annotations/instances_NAME.json")



class CocoDetection(Dataset):
    """Item: (image after ``transform``, target {boxes, labels, image_id, orig_size, size}). Crowd boxes are
    dropped for training targets (they still count in COCO evaluation, which reads the json)."""

    def __init__(self, img_folder: str | Path, annotations: str | Path | dict, transform) -> None:
        """``annotations``: a COCO json path, or an already loaded COCO dict."""
        self.img_folder = Path(img_folder)
        self.coco = annotations if isinstance(annotations, dict) else load_coco_json(annotations)
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self.anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in self.coco["annotations"]:
            self.anns.setdefault(ann["image_id"], []).append(ann)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def first(self, n: int) -> CocoDetection:
        """The first ``n`` images (by id) with the ground truth restricted to them; ``self`` when n <= 0 or
        n >= len(self)."""
        if not 0 < n < len(self):
            return self
        keep = {im["id"] for im in self.images[:n]}
        gt = {**self.coco, "images": [im for im in self.coco["images"] if im["id"] in keep],
              "annotations": [a for a in self.coco["annotations"] if a["image_id"] in keep]}
        return CocoDetection(self.img_folder, gt, self.transform)

    def __getitem__(self, idx: int):
        info = self.images[idx]
        image = load_image(self.img_folder / info["file_name"])
        w, h = image.size
        anns = [a for a in self.anns[info["id"]] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": boxes[keep], "labels": labels[keep], "image_id": int(info["id"]),
                  "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
        return self.transform(image, target)

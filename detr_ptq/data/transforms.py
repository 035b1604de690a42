"""DETR's evaluation transform: resize (shortest side ``min_size``, longest at most ``max_size``), ImageNet
normalization, boxes to normalized (cx, cy, w, h); and the collate that pads a batch and builds its mask.

Targets hold ``boxes`` [N, 4] (x0, y0, x1, y1 pixels before ``normalize``; cx, cy, w, h in [0, 1] after),
``labels`` [N], ``image_id``, ``orig_size`` and ``size`` as (height, width).
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.ops import box_convert

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def target_size(w: int, h: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """(height, width) after resizing the shortest side to ``min_size`` unless the longest would exceed
    ``max_size`` (the official DETR ``get_size_with_aspect_ratio``)."""
    size = min_size
    if max_size is not None:
        small, large = float(min(w, h)), float(max(w, h))
        if large / small * size > max_size:
            size = int(round(max_size * small / large))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image: Image.Image, target: dict, min_size: int, max_size: int | None) -> tuple[Image.Image, dict]:
    h, w = target_size(image.width, image.height, min_size, max_size)
    if (h, w) == (image.height, image.width):
        return image, {**target, "size": torch.tensor([h, w])}
    ratio_w, ratio_h = w / image.width, h / image.height
    image = image.resize((w, h), Image.BILINEAR)
    boxes = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    return image, {**target, "boxes": boxes, "size": torch.tensor([h, w])}


def normalize(image: Image.Image, target: dict) -> tuple[Tensor, dict]:
    """-> (image [3, H, W] float normalized, target with boxes as normalized cxcywh)."""
    tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
    h, w = tensor.shape[-2:]
    boxes = box_convert(target["boxes"], "xyxy", "cxcywh") / torch.tensor([w, h, w, h], dtype=torch.float32)
    return tensor, {**target, "boxes": boxes}


class DetrTransform:
    """Resize then normalize. ``min_size=800, max_size=1333`` is the official COCO validation transform."""

    def __init__(self, min_size: int = 800, max_size: int | None = 1333) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Image.Image, target: dict) -> tuple[Tensor, dict]:
        return normalize(*resize(image, target, self.min_size, self.max_size))


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """-> (images [B, 3, Hmax, Wmax] zero-padded at bottom/right, mask [B, Hmax, Wmax] True = padding, targets)."""
    images, targets = zip(*batch)
    hmax = max(i.shape[1] for i in images)
    wmax = max(i.shape[2] for i in images)
    out = images[0].new_zeros((len(images), 3, hmax, wmax))
    mask = torch.ones((len(images), hmax, wmax), dtype=torch.bool)
    for k, img in enumerate(images):
        out[k, :, : img.shape[1], : img.shape[2]] = img
        mask[k, : img.shape[1], : img.shape[2]] = False
    return out, mask, list(targets)

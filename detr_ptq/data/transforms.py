"""DETR's evaluation transform: resize (shortest side ``min_size``, longest at most ``max_size``), ImageNet
normalization, boxes to normalized (cx, cy, w, h); DETR's training augmentation (``DetrTrainTransform``: random
horizontal flip, multi-scale resize, random crop); and the collate that pads a batch and builds its mask.

Targets hold ``boxes`` [N, 4] (x0, y0, x1, y1 pixels before ``normalize``; cx, cy, w, h in [0, 1] after),
``labels`` [N], ``image_id``, ``orig_size`` and ``size`` as (height, width).
"""

from __future__ import annotations

import torch
import torchvision.transforms as T
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


# The official DETR training recipe at ``min_size = 800`` (``datasets/coco.py: make_coco_transforms``).
TRAIN_SCALES = tuple(range(480, 801, 32))  # shortest side of the multi-scale resize
CROP_PRE_SCALES = (400, 500, 600)  # resize before the random crop
CROP_RANGE = (384, 600)  # side lengths of the random crop
PER_BOX_FIELDS = ("boxes", "labels", "area", "iscrowd")


def hflip(image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
    """Mirror left-right; boxes (x0, y0, x1, y1 pixels) become (W - x1, y0, W - x0, y1)."""
    w = image.width
    boxes = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + torch.tensor([w, 0.0, w, 0])
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), {**target, "boxes": boxes}


def crop(image: Image.Image, target: dict, top: int, left: int, height: int, width: int
         ) -> tuple[Image.Image, dict]:
    """Keep the pixel region ``[top, top + height) x [left, left + width)``; boxes are shifted and clipped to it,
    boxes left with no area are dropped (with their labels), as in the official DETR ``crop``."""
    image = image.crop((left, top, left + width, top + height))
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.tensor([width, height], dtype=torch.float32)).clamp(min=0)
    keep = (boxes[:, 1, :] > boxes[:, 0, :]).all(dim=1)
    out = {**target, "boxes": boxes.reshape(-1, 4), "size": torch.tensor([height, width])}
    for key in PER_BOX_FIELDS:
        if key in out:
            out[key] = out[key][keep]
    return image, out


def _choice(values: tuple[int, ...]) -> int:
    return values[int(torch.randint(len(values), ()))]


def random_size_crop(image: Image.Image, target: dict, lo: int, hi: int) -> tuple[Image.Image, dict]:
    """Crop a random region with sides in ``[lo, min(side, hi)]`` at a random place (DETR ``RandomSizeCrop``)."""
    w = int(torch.randint(min(lo, image.width), min(image.width, hi) + 1, ()))
    h = int(torch.randint(min(lo, image.height), min(image.height, hi) + 1, ()))
    top, left, h, w = T.RandomCrop.get_params(image, (h, w))
    return crop(image, target, top, left, h, w)


class DetrTrainTransform:
    """DETR's training augmentation, then normalize: random horizontal flip (p = 0.5); then with p = 0.5 a resize of
    the shortest side to one of ``scales`` (longest <= ``max_size``), else a resize to one of ``crop_pre_scales``,
    a random crop with sides in ``crop_range`` and a resize to one of ``scales``.

    ``min_size = 800`` gives the official recipe (scales 480..800 step 32, pre-crop 400/500/600, crop 384..600);
    another ``min_size`` scales every size by ``min_size / 800``, so a small-image recipe keeps the same proportions.
    Randomness comes from torch's generator (``set_seed`` makes runs repeatable).
    """

    def __init__(self, min_size: int = 800, max_size: int | None = 1333) -> None:
        r = min_size / 800
        self.scales = tuple(sorted({max(1, round(s * r)) for s in TRAIN_SCALES}))
        self.crop_pre_scales = tuple(max(1, round(s * r)) for s in CROP_PRE_SCALES)
        self.crop_range = tuple(max(1, round(s * r)) for s in CROP_RANGE)
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict) -> tuple[Tensor, dict]:
        if torch.rand(()) < 0.5:
            image, target = hflip(image, target)
        if torch.rand(()) < 0.5:
            image, target = resize(image, target, _choice(self.scales), self.max_size)
        else:
            image, target = resize(image, target, _choice(self.crop_pre_scales), None)
            image, target = random_size_crop(image, target, *self.crop_range)
            image, target = resize(image, target, _choice(self.scales), self.max_size)
        return normalize(image, target)


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

"""ImageFolder datasets: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` with timm transforms.

Channels: ``channels=None`` keeps the images as stored: 1 channel when the first training image is grayscale (PIL
mode L, 1, I or F), else 3 (RGB). ``channels=1`` converts every image to grayscale (PIL's ITU-R 601-2 luma), and
``channels=3`` converts every image to RGB: a grayscale image becomes three equal channels. That is the explicit
conversion for feeding grayscale data to a 3-channel model. One-channel images are normalized with the mean of the
ImageNet channel statistics (0.449 / 0.226).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.errors import UserError
from gmpq.io import load_image

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

LAYOUT = "<root>/{train,val}/<class_name>/<image>.jpg"
SPLIT_DIRS = {"train": "train", "test": "val"}
GRAY_MODES = ("L", "LA", "1", "I", "I;16", "F", "P;L")
GRAY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GRAY_STD = (sum(IMAGENET_STD) / 3,)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _check_layout(root: Path) -> None:
    missing = [d for d in SPLIT_DIRS.values() if not (root / d).is_dir()]
    if missing:
        raise UserError(f"dataset 'imagefolder': {str(root)!r} lacks folder(s) {missing}; expected {LAYOUT}")
    train, val = _class_dirs(root / "train"), _class_dirs(root / "val")
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise UserError(
            f"dataset 'imagefolder': train/ and val/ in {str(root)!r} have different classes: only in train: "
            f"{only_train}, only in val: {only_val}; both must hold the same class folders ({LAYOUT})"
        )


def stored_channels(ds: ImageFolder) -> int:
    """1 if the dataset's first image is grayscale, else 3."""
    from PIL import Image

    path = ds.samples[0][0]
    try:
        with Image.open(path) as im:
            return 1 if im.mode in GRAY_MODES else 3
    except OSError as e:
        raise UserError(f"image {path!r} cannot be decoded ({type(e).__name__}: {e}); expected a JPEG or PNG "
                        f"file") from None


def imagefolder(root: Path, split: str, augment: bool, image_size: int | None = None,
                channels: int | None = None) -> ImageFolder:
    """Images [C, S, S] (S = image_size, default 224; C = ``channels``, see the module docstring), ImageNet-
    normalized; timm's RandAugment-free train transform (random resized crop + flip) when augment, else resize +
    center crop. An undecodable image is a ``UserError`` naming the file, raised when it is read."""
    _check_layout(root)
    # imported here: timm and torchvision are slow to import and only this loader needs them
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if channels not in (None, 1, 3):
        raise UserError(f"dataset 'imagefolder': data.channels={channels!r} is not supported; accepted: 1 "
                        f"(grayscale), 3 (RGB) or unset (as stored)")
    folder = root / SPLIT_DIRS[split]
    try:
        ds = ImageFolder(str(folder))
    except FileNotFoundError as e:
        raise UserError(f"dataset 'imagefolder': no images in {str(folder)!r} ({e}); expected {LAYOUT} with "
                        f"extensions {', '.join(IMG_EXTENSIONS)}") from None
    if channels is None:  # decided on the train split, so both splits agree
        channels = stored_channels(ImageFolder(str(root / SPLIT_DIRS["train"]))) if split != "train" else \
            stored_channels(ds)
    mean, std = (GRAY_MEAN, GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    ds.loader = functools.partial(load_image, mode="L" if channels == 1 else "RGB")
    ds.transform = create_transform(image_size or 224, is_training=augment, mean=mean, std=std)
    ds.num_classes = len(ds.classes)
    ds.channels = channels
    return ds

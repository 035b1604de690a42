"""ImageFolder datasets: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` with timm transforms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.errors import UserError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

LAYOUT = "<root>/{train,val}/<class_name>/<image>.jpg"
SPLIT_DIRS = {"train": "train", "test": "val"}


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


def imagefolder(root: Path, split: str, augment: bool, image_size: int | None = None) -> ImageFolder:
    """Images [3, S, S] (S = image_size, default 224), ImageNet-normalized; timm's RandAugment-free train
    transform (random resized crop + flip) when augment, else resize + center crop."""
    _check_layout(root)
    # imported here: timm and torchvision are slow to import and only this loader needs them
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = root / SPLIT_DIRS[split]
    transform = create_transform(image_size or 224, is_training=augment, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    try:
        ds = ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as e:
        raise UserError(f"dataset 'imagefolder': no images in {str(folder)!r} ({e}); expected {LAYOUT} with "
                        f"extensions {', '.join(IMG_EXTENSIONS)}") from None
    ds.num_classes = len(ds.classes)
    return ds

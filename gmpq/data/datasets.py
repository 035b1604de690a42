"""Dataset registry, ``DataConfig`` and the loaders.

    cfg = DataConfig(name="cifar10_npz", root="${GMPQ_DATA}/cifar10", test_name="cifar10_jpeg")
    train_loader, test_loader = build_loaders(cfg)

Registered datasets (``list_datasets()``):
- ``digits``: scikit-learn 8x8 digits upsampled to 1 x 16 x 16 (embedded, offline; fixed 80/20 split).
- ``cifar10``: the official python folder ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``.
- ``cifar10_npz``: ``cifar10_original_subset.npz`` (lossless, 5,085 train / 1,017 test).
- ``cifar10_jpeg``: ``cifar10_jpeg_test.npz`` (10,000 JPEG-decoded test images; test split only).
- ``imagefolder``: ``<root>/{train,val}/<class>/<image>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gmpq.data import cifar
from gmpq.data.digits import digits_dataset
from gmpq.data.imagefolder import LAYOUT as IMAGEFOLDER_LAYOUT
from gmpq.data.imagefolder import imagefolder
from gmpq.errors import UserError
from gmpq.paths import expand_path

SPLITS = ("train", "test")
DEFAULT_CIFAR_ROOT = "${GMPQ_DATA}/cifar10"


@dataclass
class DataConfig:
    """Which data, how much of it, and how it is batched.

    name: a registered dataset (see ``list_datasets()``); root: its folder or file (``${GMPQ_DATA}`` expands;
    None = ``${GMPQ_DATA}/cifar10`` for the CIFAR sets, required for imagefolder, unused for digits).
    train_subset / test_subset: keep N images, picked class-balanced (round-robin over classes, each class's
    images in a seeded random order), then kept in dataset order; None = all. seed drives the subset pick and
    the shuffling. augment: train-split augmentation (crop+flip for 32x32, shifts only for digits, timm's
    train transform for imagefolder). image_size: digits side length (default 16 = the 8x8 glyphs upsampled),
    imagefolder crop (default 224); the CIFAR sets accept only None or 32.
    test_name / test_root: evaluate on another dataset (e.g. train on cifar10_npz, test on cifar10_jpeg);
    test_root defaults to root. Both datasets must have the same class list.
    channels: image channels the model takes. None = as stored (digits 1, CIFAR 3, imagefolder 1 if its images are
    grayscale else 3); imagefolder converts to 1 (grayscale) or 3 (RGB: a grayscale image on three equal
    channels, the documented way to feed grayscale data to a 3-channel model); the other sets accept only their
    own count.
    """

    name: str = "digits"
    root: str | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    seed: int = 0
    augment: bool = True
    image_size: int | None = None
    test_name: str | None = None
    test_root: str | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        for field in ("name", "test_name"):
            value = getattr(self, field)
            if value is not None and value not in _DATASETS:
                raise UserError(f"data.{field}={value!r} is not a registered dataset; choose one of "
                                f"{list_datasets()}")
        for field in ("batch_size", "eval_batch_size", "train_subset", "test_subset", "image_size"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise UserError(f"data.{field}={value!r} must be a positive integer")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers!r} must be >= 0")
        if self.channels not in (None, 1, 3):
            raise UserError(f"data.channels={self.channels!r} is not supported; accepted: 1, 3 or unset (as stored)")


# name -> fn(root, split, augment, image_size, channels) -> Dataset with .classes, .num_classes, .targets
DatasetFn = Callable[[Path | None, str, bool, int | None, int | None], Dataset]
_DATASETS: dict[str, DatasetFn] = {}


def register_dataset(name: str) -> Callable[[DatasetFn], DatasetFn]:
    def deco(fn: DatasetFn) -> DatasetFn:
        _DATASETS[name] = fn
        return fn
    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def _native_channels(name: str, channels: int | None, native: int) -> None:
    if channels not in (None, native):
        raise UserError(f"dataset {name!r}: data.channels={channels} is not supported; its images have {native} "
                        f"channel(s) (leave data.channels unset; only imagefolder converts)")


def _cifar_root(name: str, root: Path | None, image_size: int | None, channels: int | None) -> Path:
    if image_size not in (None, 32):
        raise UserError(f"dataset {name!r}: data.image_size={image_size} is not supported; CIFAR images are 32x32 "
                        "(leave image_size unset or 32)")
    _native_channels(name, channels, 3)
    return root if root is not None else expand_path(DEFAULT_CIFAR_ROOT)


@register_dataset("digits")
def _digits(root, split, augment, image_size, channels):
    _native_channels("digits", channels, 1)
    return digits_dataset(split, augment, image_size)


@register_dataset("cifar10")
def _cifar10(root, split, augment, image_size, channels):
    return cifar.cifar10_python(_cifar_root("cifar10", root, image_size, channels), split, augment)


@register_dataset("cifar10_npz")
def _cifar10_npz(root, split, augment, image_size, channels):
    return cifar.cifar10_npz(_cifar_root("cifar10_npz", root, image_size, channels), split, augment)


@register_dataset("cifar10_jpeg")
def _cifar10_jpeg(root, split, augment, image_size, channels):
    return cifar.cifar10_jpeg(_cifar_root("cifar10_jpeg", root, image_size, channels), split, augment)


@register_dataset("imagefolder")
def _imagefolder(root, split, augment, image_size, channels):
    if root is None:
        raise UserError(f"dataset 'imagefolder' needs data.root: a folder laid out as {IMAGEFOLDER_LAYOUT}")
    return imagefolder(root, split, augment, image_size, channels)


def check_labels(ds: Dataset, source: str) -> None:
    """At least two classes, and every label in ``0 .. num_classes - 1``: anything else evaluates to a meaningless
    accuracy without a word."""
    if ds.num_classes < 2:
        raise UserError(f"{source} has {ds.num_classes} class(es) {list(ds.classes)}; a classifier needs at least 2 "
                        f"(an ImageFolder split needs one folder per class, the same folders as the model's classes)")
    targets = _targets(ds)
    if len(targets) == 0:
        raise UserError(f"{source} has no images")
    bad = targets[(targets < 0) | (targets >= ds.num_classes)]
    if len(bad):
        raise UserError(f"{source} has {len(bad)} label(s) outside 0..{ds.num_classes - 1} (its {ds.num_classes} "
                        f"classes), e.g. {sorted(set(bad.tolist()))[:10]}; fix the labels or the class list")


def check_dataset_for_model(ds: Dataset, spec, num_classes: int | None, source: str) -> None:
    """The dataset fits the model: its images have the channels of the model's input (``spec.input_size[0]``) and
    its classes are the model's outputs (``num_classes``, default ``spec.num_classes``). One ``UserError`` lists
    both problems with the way out (``data.channels``, ``--num-classes``)."""
    problems = []
    want_c = spec.input_size[0]
    have_c = int(ds[0][0].shape[0])
    if have_c != want_c:
        how = ("set data.channels=3 (imagefolder: grayscale replicated on 3 channels)" if want_c == 3 else
               "set data.channels=1 (imagefolder: converted to grayscale)") if want_c in (1, 3) else "use other data"
        problems.append(f"its images have {have_c} channel(s) but model {spec.name!r} takes {want_c}; {how}")
    outputs = num_classes or spec.num_classes
    if ds.num_classes != outputs:
        problems.append(f"it has {ds.num_classes} classes but the model has {outputs} outputs; pass --num-classes "
                        f"{ds.num_classes} (set num_classes) with weights trained for these classes")
    if problems:
        raise UserError(f"{source} does not fit the model:\n  - " + "\n  - ".join(problems))


class SubsetDataset(Dataset):
    """The items ``indices`` of ``base``, keeping its ``classes``/``num_classes``/``targets`` view."""

    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices
        self.classes, self.num_classes = base.classes, base.num_classes
        targets = _targets(base)
        self.targets = torch.as_tensor([int(targets[i]) for i in indices], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def _targets(ds: Dataset) -> torch.Tensor:
    return torch.as_tensor(ds.targets, dtype=torch.long)


def balanced_subset_indices(targets: torch.Tensor, n: int, seed: int) -> list[int]:
    """``n`` indices picked round-robin over classes (each class in a seeded random order), sorted.

    With c classes every class gets floor(n/c) or one more, as long as it has enough images.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(targets), generator=g)  # random order, then a stable sort by rank within class
    labels = targets.tolist()
    rank = [0] * len(labels)
    seen: dict[int, int] = {}
    for i in perm.tolist():
        rank[i] = seen.get(labels[i], 0)
        seen[labels[i]] = rank[i] + 1
    # sort key: rank within class first, then the class id, so the first n cycle through the classes
    order = sorted(range(len(labels)), key=lambda i: (rank[i], labels[i]))
    return sorted(order[:n])


def _source(cfg: DataConfig, split: str) -> tuple[str, str | None]:
    if split == "test" and cfg.test_name is not None:
        return cfg.test_name, cfg.test_root if cfg.test_root is not None else cfg.root
    return cfg.name, cfg.root


def build_dataset(cfg: DataConfig, split: str, train_transform: bool | None = None) -> Dataset:
    """The ``split`` ("train" | "test") dataset of ``cfg``; "test" uses ``cfg.test_name`` when set.

    train_transform: apply the training augmentation (only if ``cfg.augment``); default: split == "train".
    Items are (image [C, H, W] float normalized, label int); the dataset exposes ``.classes``,
    ``.num_classes`` and ``.targets``.
    """
    if split not in SPLITS:
        raise UserError(f"split={split!r}: expected one of {list(SPLITS)}")
    name, root = _source(cfg, split)
    if name not in _DATASETS:
        raise UserError(f"dataset {name!r} is not registered; choose one of {list_datasets()}")
    augment = cfg.augment and (split == "train" if train_transform is None else train_transform)
    ds = _DATASETS[name](expand_path(root) if root is not None else None, split, augment, cfg.image_size,
                         cfg.channels)
    check_labels(ds, f"dataset {name!r}" + (f" at {str(root)!r}" if root is not None else "") + f" ({split} split)")
    n = cfg.train_subset if split == "train" else cfg.test_subset
    if n is not None and n < len(ds):
        ds = SubsetDataset(ds, balanced_subset_indices(_targets(ds), n, cfg.seed))
    return ds


def build_loaders(cfg: DataConfig, distributed: bool = False) -> tuple[DataLoader, DataLoader]:
    """(train loader: shuffled, augmented; test loader: in order). ``distributed`` shards both with a
    ``DistributedSampler`` (the test sampler pads to a multiple of the world size, repeating a few images)."""
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test", train_transform=False)
    if cfg.test_name is not None and list(train.classes) != list(test.classes):
        raise UserError(f"data.test_name={cfg.test_name!r} has classes {list(test.classes)}, but data.name="
                        f"{cfg.name!r} has {list(train.classes)}; they must match")
    common = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0}
    if distributed:
        train_sampler = DistributedSampler(train, shuffle=True, seed=cfg.seed)
        test_sampler = DistributedSampler(test, shuffle=False)
        train_loader = DataLoader(train, cfg.batch_size, sampler=train_sampler, **common)
        test_loader = DataLoader(test, cfg.eval_batch_size, sampler=test_sampler, **common)
    else:
        g = torch.Generator().manual_seed(cfg.seed)  # same shuffling order for the same seed
        train_loader = DataLoader(train, cfg.batch_size, shuffle=True, generator=g, **common)
        test_loader = DataLoader(test, cfg.eval_batch_size, shuffle=False, **common)
    return train_loader, test_loader

"""``DetDataConfig`` -> datasets and loaders; ``--data`` strings (``voc:ROOT``, ``coco:ROOT`` or a folder)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader, DistributedSampler

from gmpq.detection.coco import load_coco
from gmpq.detection.config import DetDataConfig
from gmpq.detection.data import DetectionDataset, collate
from gmpq.detection.voc import VOC_CLASSES, load_voc
from gmpq.errors import UserError
from gmpq.paths import expand_path

FORMATS = ("voc", "coco")


def parse_data_arg(text: str) -> dict:
    """``voc:ROOT`` / ``coco:ROOT`` / ``ROOT`` (a folder holding ``VOC20*`` is VOC, one with ``annotations/`` COCO)
    -> ``{"format", "root"}``."""
    fmt, sep, root = text.partition(":")
    if sep and fmt in FORMATS:
        return {"format": fmt, "root": root}
    path = expand_path(text)
    if any(path.glob("VOC20*")):
        return {"format": "voc", "root": text}
    if (path / "annotations").is_dir():
        return {"format": "coco", "root": text}
    raise UserError(f"--data {text!r}: expected voc:VOCDEVKIT_FOLDER, coco:COCO_FOLDER, or a folder that holds "
                    "VOC20xx/ (VOC) or annotations/instances_*.json (COCO)")


def load_split(cfg: DetDataConfig, splits: list[str], train: bool, max_images: int | None) -> DetectionDataset:
    root = expand_path(cfg.root)
    if cfg.format == "voc":
        return load_voc(root, splits, tuple(cfg.classes or VOC_CLASSES), flip=train and cfg.flip,
                        max_images=max_images)
    if len(splits) != 1:
        raise UserError(f"data.train_splits={splits}: COCO-format data takes one split (e.g. [train2017])")
    if cfg.classes:
        raise UserError("data.classes applies to VOC data only; COCO-format data takes its classes from the json")
    return load_coco(Path(root), splits[0], flip=train and cfg.flip, max_images=max_images)


def build_datasets(cfg: DetDataConfig) -> tuple[DetectionDataset, DetectionDataset]:
    train = load_split(cfg, cfg.resolved_train_splits(), True, cfg.max_train_images)
    test = load_split(cfg, [cfg.resolved_test_split()], False, cfg.max_test_images)
    if train.class_names != test.class_names:
        raise UserError(f"the train and test splits have different classes: {train.class_names} vs "
                        f"{test.class_names}")
    return train, test


def make_loader(ds: DetectionDataset, batch_size: int, train: bool, num_workers: int,
                distributed: bool = False) -> DataLoader:
    sampler = DistributedSampler(ds, shuffle=train) if distributed else None
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate, drop_last=False,
                      persistent_workers=num_workers > 0)

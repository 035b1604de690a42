"""The one post-training calibration of the deploy verbs: ``gmpq evaluate --policy`` and ``gmpq export`` call it,
so a PTQ model is the same model in both (same images in the same order, same observer draws)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from gmpq.data import DataConfig, build_dataset, check_dataset_for_model
from gmpq.errors import UserError
from gmpq.quant import calibrate

SEED = 0  # the loader's shuffle and the observers' subsampling


def calibration_loader(data: DataConfig, spec, num_classes: int | None, flag: str = "--data") -> DataLoader:
    """The training split of ``data`` (no augmentation), shuffled with a fixed seed, in batches of
    ``data.batch_size``; refused with a clear error when its channels or classes do not fit the model."""
    try:
        calib = build_dataset(data, "train", train_transform=False)
    except UserError as e:
        raise UserError(f"the model's activation quantizers need calibration, but dataset {data.name!r} ({flag}) "
                        f"has no training split to calibrate on ({e}); use a fine-tuned checkpoint or other "
                        "data") from None
    check_dataset_for_model(calib, spec, num_classes, f"{flag} {data.name!r} (train split)")
    return DataLoader(calib, data.batch_size, shuffle=True, generator=torch.Generator().manual_seed(SEED))


def calibrate_on_data(model: nn.Module, data: DataConfig, spec, num_classes: int | None, calib_batches: int,
                      device: torch.device | str, flag: str = "--data") -> None:
    """Calibrate ``model``'s activation quantizers on ``calib_batches`` batches of ``data``'s training split."""
    calibrate(model, calibration_loader(data, spec, num_classes, flag), calib_batches, device, seed=SEED)

"""In-memory image datasets and their tensor transforms (digits, CIFAR arrays).

Images are kept as one tensor [N, C, H, W] (uint8 0..255 or float in [0, 1]); each item is converted to float in
[0, 1], augmented there (so padding is black, as in the reference CIFAR recipe), then normalized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

Transform = Callable[[torch.Tensor], torch.Tensor]


class ArrayTransform:
    """[C, H, W] float in [0, 1] -> normalized [C, H, W].

    augment: random crop back to H x W after zero-padding ``pad`` pixels on each side (a shift of up to ``pad``
    px, the uncovered border black), then a horizontal flip with probability 1/2 when ``flip`` (never for
    digits: a mirrored 2 is not a 2). Randomness comes from torch's global generator (seeded per worker).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: bool, flip: bool, pad: int):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.flip, self.pad = augment, flip, pad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment:
            _, h, w = x.shape
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = F.pad(x, (self.pad,) * 4)[:, dy:dy + h, dx:dx + w]
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std



class ArrayDataset(Dataset):
    """``images`` [N, C, H, W] (uint8 or float in [0, 1]), ``labels`` [N] int64 -> (image [C, H, W], label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], transform: Transform):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        self.images = images
        self.targets = labels.long()
        self.classes = [str(c) for c in classes]
        self.num_classes = len(self.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.transform(x), int(self.targets[i])

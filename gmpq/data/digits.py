"""scikit-learn's 8x8 handwritten digits (1,797 images, embedded in sklearn, no download) as a 1-channel dataset.

The 0..16 pixel values are scaled to [0, 1] and the glyphs upsampled bilinearly to ``image_size`` (default 16).
The train/test split is a fixed stratified 80/20 split (1,437 / 360 images) that does not depend on the run's
seed, so every run is evaluated on the same test images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gmpq.data.arrays import ArrayDataset, ArrayTransform
from gmpq.data.stats import DIGITS_MEAN, DIGITS_STD

DIGITS_DEFAULT_SIZE = 16
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


def digits_dataset(split: str, augment: bool, image_size: int | None = None) -> ArrayDataset:
    """Images [1, S, S] normalized with DIGITS_MEAN/STD, S = image_size (default 16); labels 0..9."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    size = image_size or DIGITS_DEFAULT_SIZE
    bunch = load_digits()
    idx = torch.arange(len(bunch.target)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=_TEST_FRACTION, random_state=_SPLIT_SEED,
                                           stratify=bunch.target)
    keep = sorted(train_idx if split == "train" else test_idx)
    images = torch.tensor(bunch.images[keep], dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(bunch.target[keep], dtype=torch.long)
    transform = ArrayTransform(DIGITS_MEAN, DIGITS_STD, augment, flip=False, pad=max(1, size // 8))
    return ArrayDataset(images, labels, [str(d) for d in range(10)], transform)

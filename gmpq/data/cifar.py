"""CIFAR-10 from the official python folder or from the npz files in ``$GMPQ_DATA/cifar10``.

All three yield 3 x 32 x 32 images normalized with the ImageNet mean/std, which is what the pretrained CIFAR
ResNets expect; augmentation is the standard random crop 32 (padding 4) + horizontal flip.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from gmpq.data.arrays import ArrayDataset, ArrayTransform
from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PY_FOLDER = "cifar-10-batches-py"
PY_LAYOUT = f"{PY_FOLDER}/{{data_batch_1..5,test_batch}}"
NPZ_FILE = "cifar10_original_subset.npz"
JPEG_FILE = "cifar10_jpeg_test.npz"


def _dataset(x_hwc: np.ndarray, y: np.ndarray, classes, augment: bool) -> ArrayDataset:
    images = torch.from_numpy(np.ascontiguousarray(x_hwc, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    transform = ArrayTransform(IMAGENET_MEAN, IMAGENET_STD, augment, flip=True, pad=4)
    return ArrayDataset(images, labels, classes, transform)


def cifar10_python(root: Path, split: str, augment: bool) -> ArrayDataset:
    """The official ``cifar-10-python.tar.gz`` extracted: ``root`` is the folder holding ``cifar-10-batches-py``
    or that folder itself."""
    folder = root if root.name == PY_FOLDER else root / PY_FOLDER
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"dataset 'cifar10': missing {', '.join(missing)} in {str(folder)!r}; expected the official python "
            f"layout <root>/{PY_LAYOUT} (extract cifar-10-python.tar.gz into data.root)"
        )
    xs, ys = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")  # the official format is a pickled dict
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"]))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"dataset 'cifar10': {str(folder / f)!r} is not a CIFAR-10 python batch ({e!r})") \
                from None
    classes = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as fh:
            names = pickle.load(fh, encoding="bytes").get(b"label_names")
        if names:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    x = np.concatenate(xs).transpose(0, 2, 3, 1)  # -> HWC like the npz files
    return _dataset(x, np.concatenate(ys), classes, augment)


def _load_npz(root: Path, default_file: str, name: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    path = root / default_file if root.is_dir() else root
    if not path.is_file():
        raise UserError(
            f"dataset {name!r}: {str(path)!r} does not exist; data.root must be the folder holding {default_file} "
            f"(e.g. ${{GMPQ_DATA}}/cifar10) or the .npz file itself, with arrays {list(keys)}"
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"dataset {name!r}: {str(path)!r} is not a readable .npz file ({e})") from None
    with npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise UserError(f"dataset {name!r}: {str(path)!r} lacks arrays {missing}; it has {sorted(npz.files)}, "
                            f"expected {list(keys)}")
        arrays = {k: npz[k] for k in keys}
        arrays["classes"] = npz["classes"] if "classes" in npz.files else np.array(CIFAR10_CLASSES)
    return arrays


def cifar10_npz(root: Path, split: str, augment: bool) -> ArrayDataset:
    """``cifar10_original_subset.npz``: lossless pixels, x_train (5085) / x_test (1017), uint8 HWC."""
    keys = ("x_train", "y_train") if split == "train" else ("x_test", "y_test")
    a = _load_npz(root, NPZ_FILE, "cifar10_npz", keys)
    return _dataset(a[keys[0]], a[keys[1]], a["classes"].tolist(), augment)


def cifar10_jpeg(root: Path, split: str, augment: bool) -> ArrayDataset:
    """``cifar10_jpeg_test.npz``: the full 10,000-image test set decoded from JPEG (test split only)."""
    if split != "test":
        raise UserError("dataset 'cifar10_jpeg' has only a test split; train on another dataset, e.g. "
                        "data.name=cifar10_npz data.test_name=cifar10_jpeg")
    a = _load_npz(root, JPEG_FILE, "cifar10_jpeg", ("x", "y"))
    return _dataset(a["x"], a["y"], a["classes"].tolist(), augment)

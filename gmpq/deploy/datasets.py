"""Dataset arguments of the deploy verbs and evaluation on extra test sets."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from gmpq.data import DataConfig, build_dataset, list_datasets
from gmpq.deploy.evaluate import evaluate
from gmpq.errors import UserError
from gmpq.paths import expand_path


def data_arg(text: str) -> dict:
    """``--data`` value -> ``{"name", "root"}``: ``NAME``, ``NAME:ROOT``, or a path whose layout is recognised
    (``.npz`` with x_train -> cifar10_npz, with x -> cifar10_jpeg; a folder with ``cifar-10-batches-py`` or
    ``data_batch_1`` -> cifar10; a folder with ``train/`` and ``val/`` -> imagefolder)."""
    names = list_datasets()
    name, _, root = text.partition(":")
    if name in names:
        return {"name": name, "root": root or None}
    path = expand_path(text)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as z:
            keys = set(z.files)
        if "x_train" in keys:
            return {"name": "cifar10_npz", "root": str(path)}
        if "x" in keys:
            return {"name": "cifar10_jpeg", "root": str(path)}
    if path.is_dir():
        if (path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").exists():
            return {"name": "cifar10", "root": str(path)}
        if (path / "train").is_dir() and (path / "val").is_dir():
            return {"name": "imagefolder", "root": str(path)}
    raise UserError(f"--data {text!r}: not a dataset name or a recognised path; use one of {names}, NAME:ROOT, "
                    "a CIFAR npz file, a cifar-10-batches-py folder or an ImageFolder root with train/ and val/")


def extra_evaluations(model: nn.Module, specs: list[str], device: torch.device, batch_size: int = 256) -> dict:
    """Evaluate on each extra test set (``--data`` syntax); returns ``{"top1_<name>", "top5_<name>", "n_<name>"}``."""
    out = {}
    for spec in specs:
        d = data_arg(spec)
        test = build_dataset(DataConfig(name=d["name"], root=d["root"], augment=False), "test", train_transform=False)
        m = evaluate(model, DataLoader(test, batch_size), device)
        out.update({f"top1_{d['name']}": m["top1"], f"top5_{d['name']}": m["top5"], f"n_{d['name']}": m["n"]})
    return out

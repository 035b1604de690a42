"""Atomic checkpoints (written by the training engine, read by `--resume`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gmpq.errors import UserError
from gmpq.io import atomic_torch_save


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    """Write ``state`` (model/optimizer/scheduler state dicts, epoch, metrics...) atomically."""
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {str(path)!r}; run without --resume to start a new run")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})") from None

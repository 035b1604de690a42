"""Atomic checkpoints and the non-finite-loss guard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gmpq.errors import NonFiniteLossError, UserError
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


def restore_training(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                     device: str | torch.device = "cpu") -> dict:
    """``--resume``: load model, optimizer and scheduler state from a ``save_checkpoint`` file in place; returns
    the whole checkpoint (``epoch`` = finished epochs, plus whatever else the loop stored)."""
    state = load_checkpoint(path, device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def check_finite(terms: dict[str, torch.Tensor | float], step: int, checkpoint: str | Path | None) -> None:
    """Raise ``NonFiniteLossError`` naming every NaN/inf term; the last good checkpoint is left untouched."""
    values = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}
    bad = [f"{k}={v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        kept = f"; the last good checkpoint is kept at {str(checkpoint)!r}" if checkpoint else ""
        raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(bad)}{kept}")

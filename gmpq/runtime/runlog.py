"""Run logs: one JSON line per epoch (``log.jsonl``, rewritten atomically), TensorBoard scalars, seeding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from gmpq.io import atomic_write_text


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunLog:
    """``scalar()`` goes to TensorBoard (``<out>/tb``); ``epoch()`` appends a JSON line to ``<out>/log.jsonl``.

    Only the main process writes (``enabled=False`` elsewhere). With ``resume`` the existing lines are kept (then
    ``truncate`` them to the finished epochs), so no finished epoch is lost; a fresh run starts an empty log.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, resume: bool = False):
        self.path = Path(out_dir) / "log.jsonl"
        self.enabled = enabled
        self.lines = self.path.read_text().splitlines() if enabled and resume and self.path.exists() else []
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def truncate(self, epochs_done: int) -> None:
        """Drop lines of epochs >= ``epochs_done`` (a resumed run repeats an unfinished epoch)."""
        self.lines = [ln for ln in self.lines if json.loads(ln).get("epoch", -1) < epochs_done]

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(name, float(value), step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.scalar(f"{prefix}/{k}", v, step)

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps(record))
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

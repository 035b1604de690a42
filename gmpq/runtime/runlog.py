"""Run logs: ``log.jsonl`` (one JSON record per finished epoch, rewritten atomically in full), TensorBoard, seeding.

The records live in the checkpoint (``engine.fit``), so ``log.jsonl`` is derived: a crash while writing it loses
nothing, and ``--resume`` rewrites it from the checkpoint.
"""

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
    """``scalar()`` goes to TensorBoard (``<out>/tb``); ``lines`` are the epoch records of ``<out>/log.jsonl``.

    Only the main process writes (``enabled=False`` elsewhere).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 lines: list[dict] | None = None):
        self.path = Path(out_dir) / "log.jsonl"
        self.enabled = enabled
        self.lines: list[dict] = list(lines or [])
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(name, float(value), step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.scalar(f"{prefix}/{k}", v, step)

    def rewrite(self) -> None:
        """Write every record to ``log.jsonl`` (atomically: the file is always a whole log)."""
        if not self.enabled:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.lines))
        if self.tb is not None:
            self.tb.flush()

    def epoch(self, record: dict) -> None:
        """Append ``record`` and rewrite the file."""
        self.lines.append(record)
        self.rewrite()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

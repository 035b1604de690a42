"""The settings every training stage shares, with one name and one meaning in every recipe and CLI.

A stage config inherits ``RunConfig`` and adds its own fields; ``gmpq.config.load_config`` rejects the old
per-stage names (``RENAMED``) with a message that gives the new one.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# old name -> the shared setting that replaces it (and how to express the old value)
RENAMED = {
    "num_threads": "threads",
    "clip_max_norm": "grad_clip (null = no clipping)",
    "lr_drop": "milestones (fractions of the epochs at which the lr is multiplied by gamma, e.g. [0.67])",
    "steps_per_epoch": "max_steps_per_epoch (null = the whole training split)",
    "out": "out_dir",
    "optim.milestones": "milestones",
    "optim.gamma": "gamma",
}


@dataclasses.dataclass
class RunConfig:
    """Settings of the training engine (``gmpq.runtime.engine.fit``). "Not set" is always ``None``."""

    out_dir: str = "runs/run"  # every output of the run goes here (checkpoint.pt, log.jsonl, tb/, ...)
    epochs: int = 1
    seed: int = 0
    threads: int | None = None  # torch CPU threads per process (None = torch's default)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    grad_clip: float | None = None  # max global gradient norm (None = no clipping)
    milestones: list[float] = dataclasses.field(default_factory=list)  # fractions of the epochs: lr *= gamma there
    gamma: float = 0.1
    warmup_iters: int = 0  # linear lr warm-up from 0.001 x lr over this many steps
    max_steps_per_epoch: int | None = None  # cap the steps of an epoch (quick runs, tests)
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    progress: bool = True  # a progress bar on a terminal; occasional plain lines in a log file
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 0")
        if any(not 0 < m <= 1 for m in self.milestones):
            raise ValueError(f"milestones={self.milestones} must be fractions of the epochs in (0, 1]")
        for name in ("max_steps_per_epoch", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 (or null = not set)")
        if self.eval_every < 1 or self.warmup_iters < 0:
            raise ValueError(f"eval_every={self.eval_every} must be >= 1 and warmup_iters={self.warmup_iters} >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0 (or null = no clipping)")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma} must be in (0, 1]")


def milestone_steps(cfg: RunConfig, steps_per_epoch: int) -> list[int]:
    """Global step indices at which the lr is multiplied by ``gamma`` (whole epochs, at least epoch 1)."""
    return sorted({max(1, round(f * cfg.epochs)) * steps_per_epoch for f in cfg.milestones})


def lr_factor(cfg: RunConfig, steps_per_epoch: int):
    """``step -> factor`` of the base lr: linear warm-up from 0.001, then x gamma at each milestone."""
    marks = milestone_steps(cfg, steps_per_epoch)

    def factor(step: int) -> float:
        warm = 1.0 if step >= cfg.warmup_iters else 0.001 + (1 - 0.001) * step / cfg.warmup_iters
        return warm * cfg.gamma ** sum(step >= m for m in marks)

    return factor

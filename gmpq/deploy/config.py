"""``FinetuneConfig``: every setting of ``gmpq finetune`` (defaults = the paper's deployment schedule)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gmpq.data import DataConfig


@dataclasses.dataclass
class KDConfig:
    enabled: bool = False  # distil from the full-precision model (same weights, frozen)
    weight: float = 1.0  # weight of the KD term; the CE term keeps weight 1
    temperature: float = 4.0


@dataclasses.dataclass
class FinetuneConfig:
    model: str = "resnet20"
    num_classes: int | None = None
    weights: str | None = None  # float weights to start from (also the KD teacher)
    policy: str | None = None  # policy JSON (required)
    w_method: Literal["symmetric", "lsq"] = "symmetric"
    a_method: Literal["pact", "lsq+"] = "pact"
    per_channel: bool = True
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    epochs: int = 40
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    milestones: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.75])  # fractions: 20, 30 of 40
    gamma: float = 0.1
    calib_batches: int = 8
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    extra_eval: list[str] = dataclasses.field(default_factory=list)  # more test sets (--data syntax) for result.json
    max_steps_per_epoch: int | None = None  # cap steps per epoch (quick runs, tests)
    out_dir: str = "runs/finetune"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 0")
        if any(not 0 < m <= 1 for m in self.milestones):
            raise ValueError(f"milestones={self.milestones} must be fractions of the epochs in (0, 1]")
        if self.calib_batches < 1:
            raise ValueError("calib_batches must be >= 1")

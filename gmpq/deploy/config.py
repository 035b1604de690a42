"""``FinetuneConfig``: every setting of ``gmpq finetune`` (defaults = the paper's deployment schedule)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gmpq.data import DataConfig
from gmpq.runtime.settings import RunConfig


@dataclasses.dataclass
class KDConfig:
    enabled: bool = False  # distil from the full-precision model (same weights, frozen)
    weight: float = 1.0  # weight of the KD term; the CE term keeps weight 1
    temperature: float = 4.0


@dataclasses.dataclass
class FinetuneConfig(RunConfig):
    """The shared run settings (``RunConfig``: out_dir, epochs, seed, threads, device, milestones, gamma, grad_clip,
    max_steps_per_epoch, eval_every, progress, tensorboard) and the fine-tune's own."""

    out_dir: str = "runs/finetune"
    epochs: int = 40
    milestones: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.75])  # fractions: 20, 30 of 40
    model: str = "resnet20"
    num_classes: int | None = None
    weights: str | None = None  # float weights to start from (also the KD teacher)
    policy: str | None = None  # policy JSON (required)
    w_method: Literal["symmetric", "lsq"] = "symmetric"
    a_method: Literal["pact", "lsq+"] = "pact"
    per_channel: bool = True
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    calib_batches: int = 8
    frozen_bn: bool = False  # BatchNorm layers stay in eval mode while training (needed for BN-folded weights such as
    #  the ImageNet MobileNetV2 of $GMPQ_DATA, whose identity BN layers would kill the features in train mode)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    extra_eval: list[str] = dataclasses.field(default_factory=list)  # more test sets (--data syntax) for result.json

    def __post_init__(self):
        super().__post_init__()
        if self.calib_batches < 1:
            raise ValueError("calib_batches must be >= 1")

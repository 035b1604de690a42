"""``SearchConfig``: every setting of ``gmpq search``, with a default for each field.

A recipe (YAML) supplies values and ``--set key=value`` overrides them (``gmpq.config.load_config``); the resolved
config is saved as ``<out_dir>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from gmpq.data import DataConfig
from gmpq.runtime.settings import RunConfig
from gmpq.search.mixed import check_candidates


@dataclasses.dataclass
class HypernetConfig:
    w_bits: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4])  # weight bit candidates (2..8)
    a_bits: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4])  # activation bit candidates (2..8)
    quantize_first: bool = False  # search the first convolution too (paper: kept in full precision)
    quantize_classifier: bool = False  # search the classifier too (paper: kept in full precision)
    include_linear: bool = False  # search other Linear layers (e.g. VGG's fully connected layers)
    signed_acts: Literal["auto", "signed", "unsigned"] = "auto"  # PACT sign: decided on calibration data by default
    calib_batches: int = 4

    def __post_init__(self):
        check_candidates(self.w_bits, "hypernet.w_bits")
        check_candidates(self.a_bits, "hypernet.a_bits")


@dataclasses.dataclass
class LossConfig:
    zeta: float = 10.0  # weight of the complexity loss R_C (our choice; the paper gives none)
    eta: float = 0.05  # weight of R_G; 0 = EdMIPS. Chosen by measurement (scripts/grad_shares.py, docs/search.md):
    #  at zeta = 10, eta = 0.05 makes R_G's gradient on the importance logits 0.8-2x R_C's. The paper gives no value
    complexity_mode: Literal["penalty", "target"] = "penalty"
    target_gbops: float | None = None  # budget in GBOPs per image (target mode): no penalty at or below it
    final_policy: Literal["budget", "argmax"] = "budget"  # target mode, last epoch: the budget-exact policy (ILP,
    #  gmpq.search.derive) or the plain argmax of the importance logits
    attribution_layer: str | None = None  # module name; None = the model's last convolutional feature map
    attribution_class: Literal["label", "teacher"] = "label"
    topk: int = 1000  # pixels of the teacher map compared (capped by the pixel count)
    capacity: Literal["aware", "fixed"] = "aware"
    fixed_p: float = 1.0  # the exponent p when capacity == "fixed"
    qw0: float = 4.0
    qa0: float = 6.0
    cam_fast_path: bool = True  # closed-form CAM for global-average-pool + linear heads (same value as Grad-CAM)

    def __post_init__(self):
        if self.complexity_mode == "target" and (self.target_gbops is None or self.target_gbops <= 0):
            raise ValueError("loss.complexity_mode='target' needs loss.target_gbops > 0 (a BOPs budget in G)")
        if self.topk < 1:
            raise ValueError(f"loss.topk={self.topk} must be >= 1")
        if self.zeta < 0 or self.eta < 0:
            raise ValueError("loss.zeta and loss.eta must be >= 0")


@dataclasses.dataclass
class OptimConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3  # network weights (and PACT clip levels)
    arch_lr: float = 1e-3  # importance logits
    weight_decay: float = 0.0  # network weights only; never on the importance logits
    momentum: float = 0.9  # sgd only


@dataclasses.dataclass
class SearchConfig(RunConfig):
    """The shared run settings (``RunConfig``: out_dir, epochs, seed, threads, device, milestones, gamma, ...) and the
    search's own. The lr is multiplied by ``gamma`` at each milestone (fractions of the epochs: 50 % and 75 %)."""

    out_dir: str = "runs/search"
    epochs: int = 10
    milestones: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.75])
    model: str = "small_cnn"
    num_classes: int | None = None  # None = the model's default
    weights: str | None = None  # pretrained float weights: the teacher, and the warm start
    init_weights: str | None = None  # without ``weights``: initialise the float model before pretraining (non-strict:
    #  layers whose shape differs, e.g. a 1000-class ImageNet head for a 10-class search, keep their random init)
    warm_start: bool = True  # initialise the hypernet's weights from ``weights``
    stem: Literal["auto", "search", "deploy"] = "auto"  # "search": the model's small-input variant
    #  (gmpq.models.search_variants: CIFAR stem, last map 4x4 at 32x32, same layer names); "auto": the variant when
    #  the model has one and the search images are at most half the deployment size; "deploy": the model as is
    pretrain_epochs: int = 0  # without ``weights``: train the float model this long first (it becomes the teacher)
    pretrain_lr: float = 3e-3
    frozen_bn: bool = False  # BatchNorm layers stay in eval mode while training (teacher and search). For weights with
    #  BN folded into the convolutions (identity BN, e.g. the ImageNet MobileNetV2 of $GMPQ_DATA) batch statistics
    #  would renormalise every layer and the features die (measured: all-zero logits in train mode)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    hypernet: HypernetConfig = dataclasses.field(default_factory=HypernetConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs={self.pretrain_epochs} must be >= 0")

    @property
    def method(self) -> str:
        """``gmpq`` with the attribution loss, ``edmips`` without it (eta = 0)."""
        return "gmpq" if self.loss.eta > 0 else "edmips"

"""Configs of ``gmpq finetune-det`` and ``gmpq evaluate-det`` (dataclasses; recipes in ``recipes/det_*.yaml``).

Default schedule (Faster R-CNN): the common "1x" detection schedule: SGD, momentum 0.9, weight decay 1e-4, batch 16,
lr 0.01, 12 epochs with lr x0.1 after epochs 8 and 11, 500 warm-up iterations; VOC07+12 trainval for training,
VOC07 test for evaluation (the paper's data). The GMPQ paper and its code do not give a detection fine-tuning
schedule, so this is a standard one, not the paper's; ``recipes/det_*.yaml`` hold the per-detector settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from gmpq.runtime.settings import RunConfig

DETECTOR_NAMES = ("fasterrcnn_resnet18_fpn", "ssd300_vgg16", "ssdlite_mobilenet_v2", "fasterrcnn_mobilenet_v2_fpn")


@dataclasses.dataclass
class DetDataConfig:
    format: Literal["voc", "coco"] = "voc"
    root: str = "data/VOCdevkit"  # VOCdevkit folder, or a COCO-format folder (annotations/ + image folders)
    train_splits: list[str] | None = None  # None: VOC2007/trainval + VOC2012/trainval (voc), train2017 (coco)
    test_split: str | None = None  # None: VOC2007/test (voc), val2017 (coco)
    classes: list[str] | None = None  # VOC class names (default: the 20 VOC classes); COCO reads the json
    batch_size: int = 16
    eval_batch_size: int = 8
    num_workers: int = 2
    flip: bool = True  # random horizontal flip for training
    max_train_images: int | None = None  # first N images only (quick runs, tests)
    max_test_images: int | None = None

    def resolved_train_splits(self) -> list[str]:
        if self.train_splits is not None:
            return list(self.train_splits)
        return ["VOC2007/trainval", "VOC2012/trainval"] if self.format == "voc" else ["train2017"]

    def resolved_test_split(self) -> str:
        return self.test_split or ("VOC2007/test" if self.format == "voc" else "val2017")


@dataclasses.dataclass
class DetectorConfig:
    name: Literal["fasterrcnn_resnet18_fpn", "ssd300_vgg16", "ssdlite_mobilenet_v2",
                  "fasterrcnn_mobilenet_v2_fpn"] = "fasterrcnn_resnet18_fpn"
    backbone_weights: str | None = None  # local state dict of the source classifier (resnet18 / vgg16 / mobilenetv2)
    min_size: int = 600  # Faster R-CNN: shorter image side after resizing (SSD300 is always 300 x 300)
    max_size: int = 1000  # Faster R-CNN: longer side at most
    size: int | None = None  # SSDLite: square input side in pixels (None: 320, torchvision's SSDLite320)
    frozen_bn: bool | None = None  # Faster R-CNN, MobileNetV2 backbones: FrozenBatchNorm; None = when weights set
    trainable_layers: int = 5  # Faster R-CNN ResNet-18: stages trained (5 = all; quantized layers need training)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # more torchvision constructor kwargs

    def __post_init__(self):
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"detector.trainable_layers={self.trainable_layers} must be in 0..5")
        if self.min_size < 32 or self.max_size < self.min_size:
            raise ValueError(f"detector.min_size={self.min_size}, max_size={self.max_size}: need 32 <= min <= max")
        if self.size is not None and (self.size < 64 or self.size % 32):
            raise ValueError(f"detector.size={self.size}: SSDLite needs a multiple of 32, at least 64")


@dataclasses.dataclass
class DetFinetuneConfig(RunConfig):
    """The shared run settings (``RunConfig``: out_dir, epochs, seed, threads, device, milestones, gamma,
    warmup_iters, grad_clip, max_steps_per_epoch, eval_every, progress, tensorboard) and the detection fine-tune's."""

    out_dir: str = "runs/finetune_det"
    epochs: int = 12
    milestones: list[float] = dataclasses.field(default_factory=lambda: [8 / 12, 11 / 12])  # fractions of epochs
    warmup_iters: int = 500
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)
    data: DetDataConfig = dataclasses.field(default_factory=DetDataConfig)
    policy: str | None = None  # policy JSON of the source classifier (required)
    init_detector: str | None = None  # model_final.pt of a trained float detector: its weights, by name, before
    # the policy quantizes the backbone (None: heads from random init, backbone from detector.backbone_weights)
    w_method: Literal["symmetric", "lsq"] = "symmetric"
    a_method: Literal["pact", "lsq+"] = "pact"
    per_channel: bool = True
    rest_w_bits: int = 32  # detector layers outside the mapped backbone (FPN, RPN, heads, SSD extras)
    rest_a_bits: int | None = None
    calib_batches: int = 8
    lr: float = 0.01
    lr_backbone: float | None = None  # lr of the layers that come from the source classifier (None = lr); lower for
    # a BN-folded pretrained one. The detector's own layers (SSD extra layers, FPN, heads) train at lr.
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_before: bool = True  # also score the calibrated, not yet fine-tuned detector (post-training quantization)

    def __post_init__(self):
        super().__post_init__()
        if self.calib_batches < 1:
            raise ValueError("calib_batches must be >= 1")

"""Detector registry: torchvision Faster R-CNN (ResNet-18 FPN, MobileNetV2 FPN), SSD300 (VGG-16) and SSDLite
(MobileNetV2; ``gmpq.detection.mobilenet``), random init, never downloading.

``build_detector(cfg, num_classes)`` returns the float detector; with ``cfg.backbone_weights`` the backbone is
loaded from a local state dict of the source classifier (timm ``resnet18`` / torchvision ``vgg16`` /
``mobilenetv2`` names, e.g. ``$GMPQ_DATA/imagenet/mobilenet_v2_imagenet.pth`` or a
``gmpq`` classification checkpoint), renamed by ``gmpq.detection.mapping``. ``num_classes`` counts the background.
Images go in as ``[3, H, W]`` floats in [0, 1]; the detectors normalise with the ImageNet mean/std, as the gmpq
classifiers do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.detection.config import DetectorConfig
from gmpq.detection.mapping import map_state_dict, source_model
from gmpq.detection.mobilenet import fasterrcnn_mobilenet_v2_fpn, ssdlite_mobilenet_v2, ssdlite_size
from gmpq.errors import UserError


def fasterrcnn_resnet18_fpn(cfg: DetectorConfig, num_classes: int) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    frozen = cfg.backbone_weights is not None if cfg.frozen_bn is None else cfg.frozen_bn
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=cfg.trainable_layers,
                                   norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d)
    return FasterRCNN(backbone, num_classes=num_classes, min_size=cfg.min_size, max_size=cfg.max_size,
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), **cfg.options)


def ssd300_vgg16(cfg: DetectorConfig, num_classes: int) -> nn.Module:
    from torchvision.models.detection import ssd300_vgg16 as tv_ssd300_vgg16

    # torchvision's default mean/std suit its caffe-style VGG weights; gmpq's vgg16 expects ImageNet mean/std.
    return tv_ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes,
                           image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), **cfg.options)


DETECTORS: dict[str, Callable[[DetectorConfig, int], nn.Module]] = {
    "fasterrcnn_resnet18_fpn": fasterrcnn_resnet18_fpn,
    "ssd300_vgg16": ssd300_vgg16,
    "ssdlite_mobilenet_v2": ssdlite_mobilenet_v2,
    "fasterrcnn_mobilenet_v2_fpn": fasterrcnn_mobilenet_v2_fpn,
}


def cost_input_size(cfg: DetectorConfig) -> tuple[int, int, int]:
    """(C, H, W) at which backbone BOPs are counted: 300 x 300 for SSD300, ``size`` (320) square for SSDLite; for
    Faster R-CNN a 4:3 image resized to ``min_size`` (e.g. 600 x 800, a typical VOC image), capped at ``max_size``."""
    if cfg.name == "ssd300_vgg16":
        return (3, 300, 300)
    if cfg.name == "ssdlite_mobilenet_v2":
        return (3, ssdlite_size(cfg), ssdlite_size(cfg))
    return (3, cfg.min_size, min(cfg.max_size, round(cfg.min_size * 4 / 3)))


def load_backbone_weights(model: nn.Module, detector: str, path: str) -> dict:
    """Load a source-classifier state dict into the detector's backbone. Every mapped key must exist in the detector
    with the same shape, and every backbone weight that the source network has must be given; one ``UserError``
    lists all mismatches. Returns ``{"loaded": n, "dropped": [...]}``."""
    from gmpq.models.weights import _torch_load, extract_state_dict
    from gmpq.paths import expand_path

    p = expand_path(path)
    if not p.is_file():
        raise UserError(f"detector.backbone_weights: {str(p)!r} does not exist (a local {source_model(detector)} "
                        "state dict; nothing is downloaded)")
    mapped, dropped = map_state_dict(detector, extract_state_dict(_torch_load(p), p))
    own = model.state_dict()
    # FrozenBatchNorm2d has no step counter; the counter is bookkeeping, not a weight.
    mapped = {k: v for k, v in mapped.items() if k in own or not k.endswith("num_batches_tracked")}
    unexpected = sorted(k for k in mapped if k not in own)
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs detector {tuple(own[k].shape)}" for k, v in mapped.items()
                    if k in own and own[k].shape != v.shape)
    missing = sorted(k for k in source_keys(detector) if k in own and k not in mapped)
    if unexpected or shapes or missing:
        lines = [f"backbone weights {str(p)!r} do not fit {detector!r}:"]
        for title, items in (("not in the detector", unexpected), ("shape mismatches", shapes),
                             ("backbone weights missing from the file", missing)):
            if items:
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:20])}")
        raise UserError("\n".join(lines))
    model.load_state_dict(mapped, strict=False)
    return {"loaded": len(mapped), "dropped": dropped}


@functools.cache
def source_keys(detector: str) -> frozenset[str]:
    """Detector state-dict keys that are images of source-network keys (what backbone weights must provide)."""
    from gmpq.detection.mapping import source_network

    return frozenset(map_state_dict(detector, source_network(detector).state_dict())[0])


def build_detector(cfg: DetectorConfig, num_classes: int) -> nn.Module:
    """The float detector with ``num_classes`` outputs (background included), backbone weights loaded if given."""
    if cfg.name not in DETECTORS:
        raise UserError(f"unknown detector {cfg.name!r}; accepted detectors: {sorted(DETECTORS)}")
    if num_classes < 2:
        raise UserError(f"num_classes={num_classes}: a detector needs the background plus at least one class")
    try:
        model = DETECTORS[cfg.name](cfg, num_classes)
    except TypeError as e:  # an unknown key in detector.options
        raise UserError(f"detector.options {cfg.options} were not accepted by {cfg.name!r}: {e}") from None
    if cfg.backbone_weights:
        load_backbone_weights(model, cfg.name, cfg.backbone_weights)
    return model


def load_detector_weights(model: nn.Module, path: str, class_names: list[str] | None = None) -> dict:
    """Initialise the float ``model`` from a trained float detector: the ``model_final.pt`` of a ``finetune-det``
    run with a float policy (or a plain state dict of the same detector). Loaded by name, strictly: one ``UserError``
    lists the keys missing from the file, the keys the detector does not have and the shape mismatches. Quantize the
    model afterwards (``apply_policy`` keeps parameter names and tensors). With ``class_names``, a checkpoint that
    carries its own class names must have the same ones. Returns ``{"loaded": n, "class_names": [...] | None}``."""
    from gmpq.paths import expand_path

    p = expand_path(path)
    if not p.is_file():
        raise UserError(f"init_detector: {str(p)!r} does not exist (the model_final.pt of a float "
                        "`gmpq finetune-det` run)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise UserError(f"init_detector: {str(p)!r} cannot be read ({type(e).__name__}: {e})") from None
    weights = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"init_detector: {str(p)!r} is neither a model_final.pt of `gmpq finetune-det` nor a state "
                        "dict of tensors")
    theirs = state.get("class_names") if "model" in state else None
    if class_names is not None and theirs is not None and list(theirs) != list(class_names):
        raise UserError(f"init_detector: the detector in {str(p)!r} was trained on the classes {list(theirs)}, the "
                        f"data has the classes {list(class_names)}")
    own = model.state_dict()
    missing = sorted(k for k in own if k not in weights)
    unexpected = sorted(k for k in weights if k not in own)
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs detector {tuple(own[k].shape)}" for k, v in weights.items()
                    if k in own and own[k].shape != v.shape)
    if missing or unexpected or shapes:
        lines = [f"init_detector: {str(p)!r} does not fit this detector (it must be a float detector of the same "
                 "name, size options and classes, e.g. the model_final.pt of a float-policy `finetune-det` run):"]
        for title, items in (("missing from the file", missing), ("not in the detector", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:20])}" + (" ..." if len(items) > 20 else ""))
        raise UserError("\n".join(lines))
    model.load_state_dict(weights)
    return {"loaded": len(weights), "class_names": None if theirs is None else list(theirs)}

"""Detectors on the ImageNet MobileNetV2 (``gmpq`` model ``mobilenetv2``: torchvision's MobileNetV2 with TF 'SAME'
padding): SSDLite (torchvision's SSDLite320 heads, extra layers and anchors) and Faster R-CNN with an FPN.

The backbone keeps the classifier's module names, so a policy or a state dict of ``mobilenetv2`` maps by a prefix:
``features.N.*`` -> ``backbone.features.N.*`` (SSDLite) or ``backbone.body.N.*`` (Faster R-CNN, whose
``IntermediateLayerGetter`` holds the children of ``features``). The classifier (``classifier.1``) is dropped.

Feature maps (at 320 x 320 input):

- SSDLite (MobileNetV2 paper, section 6.2; TF object detection API ``ssdlite_mobilenet_v2``): the expansion output of
  ``features.14`` (576 channels, stride 16, 20 x 20), the last 1x1 conv ``features.18`` (1280, stride 32, 10 x 10),
  then four extra blocks (512, 256, 256, 128 channels; 5, 3, 2, 1). Heads: depthwise 3x3 + 1x1 per map, six
  anchors per location (aspect ratios 1, 2, 3 and their inverses, scales 0.2 .. 0.95 of the image; set with
  ``detector.options: {min_ratio, max_ratio}``; the other options go to torchvision's ``SSD``).
- Faster R-CNN: FPN (256 channels) over ``features.13`` (96, stride 16) and ``features.18`` (1280, stride 32) plus a
  max-pooled level (stride 64); anchors 32..512 px, aspect ratios 0.5, 1, 2 on every level, as torchvision's
  ``fasterrcnn_mobilenet_v3_large_fpn``.

The ImageNet weights in ``$GMPQ_DATA/imagenet`` have batch-norm folded into the convolutions (every BN layer is the
identity plus a bias), so with them the backbone's BN statistics are frozen (``FrozenBatchNorm2d``); the extra
layers and heads use ordinary BatchNorm (eps 1e-3, momentum 0.03, as torchvision's SSDLite).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

from torch import Tensor, nn

from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.detection.config import DetectorConfig

SSDLITE_C4 = 14  # features.14: first stride-32 block; its expansion output (stride 16) is SSDLite's first map
FPN_LAYERS = {"13": "0", "18": "1"}  # features index -> FPN level name (stride 16 and 32)
SSDLITE_DEFAULTS = {"score_thresh": 0.001, "nms_thresh": 0.55, "detections_per_img": 300, "topk_candidates": 300}


def mobilenet_v2_features(cfg: DetectorConfig) -> nn.Sequential:
    """``features`` of the ``mobilenetv2`` classifier (TF 'SAME' padding). BN statistics are frozen
    (``FrozenBatchNorm2d``) if ``cfg.frozen_bn``, or when it is None and backbone weights are given."""
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    from gmpq.models.imagenet import tf_same_padding

    frozen = cfg.backbone_weights is not None if cfg.frozen_bn is None else cfg.frozen_bn
    norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    return tf_same_padding(torchvision.models.mobilenet_v2(weights=None, norm_layer=norm)).features


class SSDLiteMobileNetV2Features(nn.Module):
    """MobileNetV2 ``features`` (classifier names kept) plus SSDLite's extra blocks.

    ``forward(x [B, 3, H, W])`` -> ``OrderedDict`` of six maps: ``[B, 576, H/16, W/16]``, ``[B, 1280, H/32, W/32]``,
    then ``[B, 512|256|256|128, ...]`` each halving the side.
    """

    def __init__(self, features: nn.Sequential, c4: int = SSDLITE_C4):
        super().__init__()
        from torchvision.models.detection.ssdlite import _extra_block, _normal_init

        if features[c4].use_res_connect:
            raise ValueError(f"features.{c4} has a residual connection: its expansion output cannot be tapped")
        self.features, self.c4 = features, c4
        norm = functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        channels = [features[-1].out_channels, 512, 256, 256, 128]
        self.extra = nn.ModuleList(_extra_block(a, b, norm) for a, b in zip(channels, channels[1:]))
        _normal_init(self.extra)
        self.out_channels = [features[c4].conv[0].out_channels, *channels]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        for block in self.features[:self.c4]:
            x = block(x)
        # Run features.c4 layer by layer (it has no residual) to tap its expansion output: SSDLite's stride-16 map.
        layers = list(self.features[self.c4].conv)
        x = layers[0](x)
        out = [x]
        for layer in layers[1:]:
            x = layer(x)
        for block in self.features[self.c4 + 1:]:
            x = block(x)
        out.append(x)
        for block in self.extra:
            x = block(x)
            out.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(out))


def ssdlite_size(cfg: DetectorConfig) -> int:
    """Square input side of SSDLite: ``detector.size`` or 320."""
    return cfg.size or 320


def ssdlite_mobilenet_v2(cfg: DetectorConfig, num_classes: int) -> nn.Module:
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.ssdlite import SSDLiteHead

    options = dict(cfg.options)
    # anchor scales (fractions of the image side) are options of the box generator, not of SSD
    ratios = {k: options.pop(k) for k in ("min_ratio", "max_ratio") if k in options}
    backbone = SSDLiteMobileNetV2Features(mobilenet_v2_features(cfg))
    size = (ssdlite_size(cfg), ssdlite_size(cfg))
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], **({"min_ratio": 0.2, "max_ratio": 0.95} | ratios))
    norm = functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    head = SSDLiteHead(backbone.out_channels, anchors.num_anchors_per_location(), num_classes, norm)
    # gmpq's mobilenetv2 takes ImageNet mean/std (torchvision's SSDLite default [-1, 1] suits other weights).
    kwargs = SSDLITE_DEFAULTS | {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)} | options
    return SSD(backbone, anchors, size, num_classes, head=head, **kwargs)


def fasterrcnn_mobilenet_v2_fpn(cfg: DetectorConfig, num_classes: int) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    features = mobilenet_v2_features(cfg)
    in_channels = [features[int(i)].out_channels for i in FPN_LAYERS]
    backbone = BackboneWithFPN(features, FPN_LAYERS, in_channels, 256, extra_blocks=LastLevelMaxPool())
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=anchors, min_size=cfg.min_size,
                      max_size=cfg.max_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                      **cfg.options)

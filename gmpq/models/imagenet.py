"""ImageNet-style models (3 x 224 x 224, ImageNet normalization) from timm and torchvision, random init only.

Weights never download: load a local file with ``create_model(name, weights=path)``. timm and torchvision are
imported inside the builders so that ``import gmpq.models`` stays fast.
"""

from __future__ import annotations

from torch import nn

from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.models.registry import ModelSpec, register_model


def _spec(name: str, first: str, classifier: str, feature: str, head: str = "gap_linear") -> ModelSpec:
    return ModelSpec(name=name, input_size=(3, 224, 224), num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     first_layer=first, classifier=classifier, feature_layer=feature, head=head)


@register_model("resnet18", _spec("resnet18", "conv1", "fc", "layer4"))
def resnet18(num_classes: int = 1000) -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)


@register_model("resnet50", _spec("resnet50", "conv1", "fc", "layer4"))
def resnet50(num_classes: int = 1000) -> nn.Module:
    import timm

    return timm.create_model("resnet50", pretrained=False, num_classes=num_classes)


# timm's MobileNetV2 ends conv_head (1x1) -> bn2 (BN + ReLU6) -> global_pool -> classifier, so bn2 holds the map.
@register_model("mobilenetv2_100", _spec("mobilenetv2_100", "conv_stem", "classifier", "bn2"))
def mobilenetv2_100(num_classes: int = 1000) -> nn.Module:
    import timm

    return timm.create_model("mobilenetv2_100", pretrained=False, num_classes=num_classes)


# VGG-16 (the SSD backbone in the GMPQ paper): features.29 is the last conv's ReLU (14x14 map); the head is
# max-pool -> adaptive avg-pool 7x7 -> three Linear layers, hence head="other" (no closed-form CAM).
@register_model("vgg16", _spec("vgg16", "features.0", "classifier.6", "features.29", head="other"))
def vgg16(num_classes: int = 1000) -> nn.Module:
    import torchvision

    return torchvision.models.vgg16(weights=None, num_classes=num_classes)

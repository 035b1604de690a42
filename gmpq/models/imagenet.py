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



class TFSamePad(nn.Sequential):
    """A ``Sequential`` (conv, BN, activation) whose input is first padded by one pixel on the right and bottom.

    With the convolution's own padding at 0 this is TensorFlow's 'SAME' padding for a stride-2 3x3 convolution on
    an even-sized input. The children keep their indices, so state-dict keys and policy layer names are those of
    the plain torchvision model, and quantizing the convolution inside (``gmpq.quant.apply_policy``) keeps the pad.
    """

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


def tf_same_padding(model: nn.Module) -> nn.Module:
    """Give every stride-2 3x3 convolution of a torchvision MobileNetV2 TF 'SAME' padding, in place.

    Networks trained in TensorFlow (the ImageNet MobileNetV2 in ``$GMPQ_DATA/imagenet``) expect it; torchvision
    pads both sides, which costs up to 9 points of top-1 (see ``$GMPQ_DATA/README.md``).
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            first = child[0] if isinstance(child, nn.Sequential) and len(child) else None
            if (type(child) is not TFSamePad and isinstance(first, nn.Conv2d) and first.stride == (2, 2)
                    and first.kernel_size == (3, 3)):
                first.padding = (0, 0)
                setattr(parent, child_name, TFSamePad(*child.children()))
    return model


# torchvision's MobileNetV2 with TF 'SAME' padding: the architecture of the ImageNet-pretrained network in
# $GMPQ_DATA/imagenet/mobilenet_v2_imagenet.pth (load it with create_model("mobilenetv2", weights=...)).
# features.18 is the last 1x1 conv block (Conv-BN-ReLU6, 1280 channels, 7x7 at 224); head = GAP -> dropout -> fc.
@register_model("mobilenetv2", _spec("mobilenetv2", "features.0.0", "classifier.1", "features.18"))
def mobilenetv2(num_classes: int = 1000) -> nn.Module:
    import torchvision

    return tf_same_padding(torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes))

"""Search-time variants of ImageNet models, for searching a policy on small (32 x 32) images.

An ImageNet network divides its input by 32: at 32 x 32 its last feature map is 1 x 1, so a Grad-CAM there is
one number and the attribution loss R_G is constant. As in the official GMPQ code (a CIFAR-stem ResNet-18), the
variant removes early down-sampling so the last map is 4 x 4 at 32 x 32:

- ResNets (timm): ``conv1`` becomes a 3x3 stride-1 convolution and ``maxpool`` the identity (the CIFAR stem).
- MobileNetV2 (torchvision ``mobilenetv2`` and timm ``mobilenetv2_100``): the first conv and the first stride-2
  depthwise conv run at stride 1 (the other three stride-2 stages remain: 32 / 8 = 4).

Each variant is the deployment model built by the registry and then modified IN PLACE, so every module keeps its
name: a policy searched on the variant names exactly the layers of the deployment model, and validates on it
unchanged (``tests/test_search_variants.py``). Only the ResNets' first conv changes shape (it is kept in full
precision by the search and is not part of any searched policy).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gmpq.errors import UserError
from gmpq.models.imagenet import TFSamePad
from gmpq.models.registry import create_model

SEARCH_TAG = "search_variant_of"  # attribute set on a variant: the name of its deployment model


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _stride1(model: nn.Module, name: str) -> None:
    """Make the conv at ``name`` (or the first child conv of the Sequential at ``name``) run at stride 1 with
    symmetric 'same' padding; a TF-'SAME' wrapper becomes a plain ``Sequential`` (children and names kept)."""
    module = model.get_submodule(name)
    conv = module[0] if isinstance(module, nn.Sequential) else module
    conv.stride = (1, 1)
    conv.padding = tuple(k // 2 for k in conv.kernel_size)
    if type(module) is TFSamePad:
        _set(model, name, nn.Sequential(*module.children()))


def _resnet(model: nn.Module) -> nn.Module:
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
    model.maxpool = nn.Identity()
    return model


def _mobilenetv2_torchvision(model: nn.Module) -> nn.Module:
    for name in ("features.0", "features.2.conv.1"):
        _stride1(model, name)
    return model


def _mobilenetv2_timm(model: nn.Module) -> nn.Module:
    for name in ("conv_stem", "blocks.1.0.conv_dw"):
        _stride1(model, name)
    return model


VARIANTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "resnet18": _resnet,
    "resnet50": _resnet,
    "mobilenetv2": _mobilenetv2_torchvision,
    "mobilenetv2_100": _mobilenetv2_timm,
}


def has_search_variant(name: str) -> bool:
    return name in VARIANTS


def create_search_model(name: str, num_classes: int | None = None) -> nn.Module:
    """The search-time variant of registered model ``name`` (random init; see the module docstring)."""
    if name not in VARIANTS:
        raise UserError(f"model {name!r} has no search-time (small-input) variant; models with one: "
                        f"{sorted(VARIANTS)}")
    model = VARIANTS[name](create_model(name, num_classes))
    setattr(model, SEARCH_TAG, name)
    return model


def is_search_variant(model: nn.Module) -> bool:
    return getattr(model, SEARCH_TAG, None) is not None

"""Backbones with the official DETR names: ``backbone.0.body.{conv1,bn1,layer1..layer4}``, ``backbone.1`` = the
position embedding (no parameters).

``resnet50``: torchvision's ResNet-50 with ``FrozenBatchNorm2d`` (weights come from a local checkpoint only;
nothing is downloaded). ``tiny_resnet``: a narrow ResNet-18-style net (BasicBlocks, widths e.g. 16-32-64-128,
overall stride 16, trainable BatchNorm) so the whole reference detector stays below 10 MB and trains on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from gmpq.errors import UserError

NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


class TinyResNet(nn.Module):
    """3x3 stride-2 stem, then four stages of two BasicBlocks (strides 1, 2, 2, 2): overall stride 16.

    forward(x [B, 3, H, W]) -> [B, widths[-1], H/16, W/16]. Layer names match torchvision's ResNet.
    """

    def __init__(self, widths: tuple[int, ...], norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"tiny_resnet needs 4 stage widths, got {list(widths)}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = widths[0]
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
            down = None
            if stride != 1 or in_ch != width:
                down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), norm_layer(width))
            blocks = [BasicBlock(in_ch, width, stride, down, norm_layer=norm_layer),
                      BasicBlock(width, width, norm_layer=norm_layer)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_ch = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _make_body(name: str, norm: str, widths: tuple[int, ...]) -> tuple[nn.Module, int]:
    if norm not in NORM_LAYERS:
        raise UserError(f"backbone norm {norm!r} is unknown; accepted: {sorted(NORM_LAYERS)}")
    norm_layer = NORM_LAYERS[norm]
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None, norm_layer=norm_layer), 2048
    if name == "tiny_resnet":
        return TinyResNet(tuple(widths), norm_layer), widths[-1]
    raise UserError(f"backbone {name!r} is unknown; accepted: ['resnet50', 'tiny_resnet']")


class Backbone(nn.Module):
    """forward(images [B, 3, H, W], mask [B, H, W] bool) -> (features [B, C, h, w], mask [B, h, w])."""

    def __init__(self, name: str, norm: str, widths: tuple[int, ...] = (), train_stem: bool = False,
                 train_backbone: bool = True) -> None:
        super().__init__()
        net, self.num_channels = _make_body(name, norm, widths)
        for pname, p in net.named_parameters():
            # As the official recipe: a pretrained stem and layer1 stay frozen; a net trained from scratch
            # (train_stem=True) trains everything.
            trainable = train_backbone and (train_stem or any(f"layer{i}" in pname for i in (2, 3, 4)))
            p.requires_grad_(trainable)
        self.body = IntermediateLayerGetter(net, return_layers={"layer4": "0"})

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.body(images)["0"]
        small_mask = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(mask.dtype)[0]
        return feat, small_mask


class Joiner(nn.Sequential):
    """``Sequential(backbone, position_embedding)`` so the parameter names are ``backbone.0.*`` as in DETR.

    forward(images, mask) -> (features [B, C, h, w], mask [B, h, w], pos [B, d_model, h, w]).
    """

    def __init__(self, backbone: Backbone, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat, small_mask = self[0](images, mask)
        pos = self[1](small_mask).to(feat.dtype)
        return feat, small_mask, pos

"""CIFAR-10 ResNet-20/32/44/56 in the original He et al. (2016) design, parameter names compatible with the
pretrained ``cifar_resnets/*.th`` files (after stripping ``module.``).

Three stages of BasicBlocks at 16/32/64 channels on 32x32/16x16/8x8 maps, depth = 6n + 2. Shortcuts are
"option A": stride-2 subsampling plus zero-padding of the extra channels, so they hold no parameters and the
only quantizable layers are the convolutions and the final ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.models.registry import ModelSpec, register_model


class PadShortcut(nn.Module):
    """Option-A shortcut: [B, C, H, W] -> [B, C_out, H/2, W/2], subsample then zero-pad channels equally."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.pad = (out_planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """[B, 3, 32, 32] normalized images -> [B, num_classes] logits."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # Kaiming init as in the reference implementation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))  # [B, 64, 8, 8], post-ReLU
        return self.linear(out.mean(dim=(2, 3)))


def _spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, input_size=(3, 32, 32), num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     first_layer="conv1", classifier="linear", feature_layer="layer3", head="gap_linear")


@register_model("resnet20", _spec("resnet20"))
def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


@register_model("resnet32", _spec("resnet32"))
def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


@register_model("resnet44", _spec("resnet44"))
def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(44, num_classes)


@register_model("resnet56", _spec("resnet56"))
def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)

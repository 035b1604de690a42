"""A small CNN for the quickstart on scikit-learn digits (1 x 16 x 16 inputs, 10 classes, ~46 k parameters).

conv1 3x3 (1->16) -> conv2 3x3 stride 2 (16->32) -> conv3 depthwise 3x3 (32) -> conv4 pointwise 1x1 (32->64)
-> conv5 3x3 stride 2 (64->64) -> global average pool -> fc (64->10). Every conv is Conv-BN-ReLU, so the model has
the layer kinds that matter for mixed precision (a sensitive first layer, a depthwise conv, a 1x1 conv, a
classifier) while training to >95 % on digits in seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from gmpq.data.stats import DIGITS_MEAN, DIGITS_STD
from gmpq.models.registry import ModelSpec, register_model


class ConvBNReLU(nn.Module):
    """[B, C_in, H, W] -> [B, C_out, H / stride, W / stride]."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """[B, in_channels, H, W] normalized images -> [B, num_classes] logits (any H, W >= 4)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.conv1 = ConvBNReLU(in_channels, w)
        self.conv2 = ConvBNReLU(w, 2 * w, stride=2)
        self.conv3 = ConvBNReLU(2 * w, 2 * w, groups=2 * w)  # depthwise
        self.conv4 = ConvBNReLU(2 * w, 4 * w, kernel=1)  # pointwise
        self.conv5 = ConvBNReLU(4 * w, 4 * w, stride=2)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))  # [B, 4w, H/4, W/4]
        return self.fc(x.mean(dim=(2, 3)))


@register_model("small_cnn", ModelSpec(
    name="small_cnn", input_size=(1, 16, 16), num_classes=10, mean=DIGITS_MEAN, std=DIGITS_STD,
    first_layer="conv1.conv", classifier="fc", feature_layer="conv5", head="gap_linear"))
def small_cnn(num_classes: int = 10) -> SmallCNN:
    return SmallCNN(num_classes)

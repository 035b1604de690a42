"""Training mode with frozen BatchNorm: the switch every training stage applies at the start of an epoch."""

from __future__ import annotations

from torch import nn


def train_mode(model: nn.Module, frozen_bn: bool) -> nn.Module:
    """``model.train()``, with its BatchNorm layers back in eval mode (running statistics) when ``frozen_bn``.

    Needed for weights whose BatchNorm was folded into the convolutions (identity BN layers, e.g. the ImageNet
    MobileNetV2 of ``$GMPQ_DATA``): in train mode their batch statistics renormalise every layer and the features
    die (measured: all-zero logits)."""
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model

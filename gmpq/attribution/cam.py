"""Grad-CAM with captum (``captum.attr.LayerGradCam``), upsampled to the input size.

``tests/test_attribution.py`` checks that it equals the project's own Grad-CAM (``gmpq.search.gradcam``), which the
search differentiates through.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def captum_gradcam(model: nn.Module, layer: str, x: Tensor, target: Tensor, upsample: bool = True) -> Tensor:
    """Grad-CAM ``[N, H, W]`` (input size; ``[N, h, w]`` at the layer if not ``upsample``) of class ``target [N]``
    for images ``x [N, C, H, W]``, at the output of ``model.<layer>``. ``model`` should be in eval mode."""
    from captum.attr import LayerAttribution, LayerGradCam  # late import: captum is only needed here

    cam = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=target, relu_attributions=True)
    if upsample:
        cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return cam.squeeze(1).detach()


@torch.no_grad()
def predicted_class(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(dim=1)

"""Grad-CAM attributions (Selvaraju et al. 2017) for the generalization loss R_G.

For a feature map ``A [N, C, h, w]`` at the attribution layer and the score ``y_c`` of class ``c``:
``weights_k = mean_ij dy_c / dA_kij`` and ``M = relu(sum_k weights_k A_k)`` ``[N, h, w]``.

- Student (hypernet): ``create_graph=True`` so that ``M`` is differentiable w.r.t. the network weights AND the
  importance logits (the gradient ``dy_c/dA`` itself depends on them).
- Teacher (frozen float model): the same function without a graph, its result detached.
- Fast path (CAM, Zhou et al. 2016): when the map feeds straight into global-average-pool + linear, ``dy_c/dA_kij =
  W_fc[c, k] / (h w)`` for every position, so ``M = relu(sum_k W_fc[c, k] A_k / (h w))`` without a second backward.
  ``tests/test_search_gradcam.py`` checks it equals the autograd result (values and gradients).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmpq.errors import UserError


@contextmanager
def capture_features(model: nn.Module, layer: str, make_leaf: bool = False):
    """Record the output of ``model.<layer>`` during forward passes inside the block: ``store["features"]``.

    ``make_leaf`` replaces the output by a detached copy that requires grad, so Grad-CAM can differentiate a frozen
    model's score w.r.t. it (the frozen model's own output would not require grad).
    """
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise UserError(f"attribution layer {layer!r} is not a module of the model; modules: {names}") from None
    store: dict[str, Tensor] = {}

    def hook(mod: nn.Module, inputs: tuple, output: Tensor):
        if make_leaf:
            output = output.detach().requires_grad_(True)
        store["features"] = output
        return output

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def grad_cam(features: Tensor, logits: Tensor, target: Tensor, create_graph: bool) -> Tensor:
    """Grad-CAM map ``[N, h, w]`` of class ``target [N]`` from ``features [N, C, h, w]`` and ``logits [N, K]``.

    ``features`` must be part of the graph that produced ``logits``. With ``create_graph`` the map can be
    back-propagated (second-order terms included).
    """
    score = logits.gather(1, target.view(-1, 1)).sum()  # samples are independent: one backward for the batch
    (grads,) = torch.autograd.grad(score, features, create_graph=create_graph, retain_graph=True)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # [N, C, 1, 1]
    return torch.relu((weights * features).sum(dim=1))


def cam_closed_form(features: Tensor, fc_weight: Tensor, target: Tensor) -> Tensor:
    """Grad-CAM of a global-average-pool + linear head in closed form: ``relu(sum_k W[c,k] A_k / (h w))``.

    ``features [N, C, h, w]`` (the tensor that is pooled), ``fc_weight [K, C]``, ``target [N]`` -> ``[N, h, w]``.
    """
    h, w = features.shape[-2:]
    return torch.relu(torch.einsum("nc,nchw->nhw", fc_weight[target], features) / (h * w))


def upsample(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize ``[N, h, w]`` -> ``[N, H, W]`` (input resolution)."""
    return F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def select_target(labels: Tensor, teacher_logits: Tensor, mode: str) -> Tensor:
    """Class explained by both maps: the ground truth (``"label"``) or the teacher's prediction (``"teacher"``)."""
    if mode == "label":
        return labels
    if mode == "teacher":
        return teacher_logits.argmax(dim=1)
    raise UserError(f"loss.attribution_class={mode!r} is not accepted; accepted values: ['label', 'teacher']")


def teacher_attribution(teacher: nn.Module, x: Tensor, labels: Tensor, layer: str, target_mode: str,
                        fc_weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher Grad-CAM ``[N, H, W]`` at input resolution (detached), the explained class ``[N]`` and its logits.

    ``fc_weight`` (``[K, C]``) selects the closed-form CAM path; ``None`` uses autograd Grad-CAM.
    """
    if fc_weight is not None:
        with torch.no_grad(), capture_features(teacher, layer) as store:
            logits = teacher(x)
            target = select_target(labels, logits, target_mode)
            cam = cam_closed_form(store["features"], fc_weight, target)
    else:
        with torch.enable_grad(), capture_features(teacher, layer, make_leaf=True) as store:
            logits = teacher(x)
            target = select_target(labels, logits, target_mode)
            cam = grad_cam(store["features"], logits, target, create_graph=False)
    return upsample(cam.detach(), tuple(x.shape[-2:])), target, logits.detach()


def student_attribution(features: Tensor, logits: Tensor, target: Tensor, size: tuple[int, int],
                        fc_weight: Tensor | None) -> Tensor:
    """Differentiable student Grad-CAM ``[N, H, W]`` from the hypernet's captured ``features`` and ``logits``."""
    if fc_weight is not None:
        cam = cam_closed_form(features, fc_weight, target)
    else:
        cam = grad_cam(features, logits, target, create_graph=True)
    return upsample(cam, size)


MIN_MAP_SIDE = 2


@torch.no_grad()
def check_attribution_map(model: nn.Module, layer: str, input_shape: tuple[int, ...], model_name: str = "") -> tuple:
    """The ``(h, w)`` of ``layer``'s map for inputs ``(C, H, W)``; a ``UserError`` when a side is below 2.

    A 1 x 1 map upsamples to a constant: the attribution loss is then constant and its gradient ~0, so the search
    would silently be EdMIPS. ``model`` is a float model (run once, eval mode, on zeros).
    """
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with capture_features(model, layer) as store:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    h, w = store["features"].shape[-2:]
    if min(h, w) < MIN_MAP_SIDE:
        raise UserError(
            f"the attribution layer {layer!r} of {model_name or type(model).__name__} has a {h} x {w} map at input "
            f"size {input_shape[-2]} x {input_shape[-1]}: its Grad-CAM would be constant and R_G would not act "
            f"(a map of at least {MIN_MAP_SIDE} x {MIN_MAP_SIDE} is needed). Fix: use the model's search-time "
            "variant (stem=search or stem=auto; models with one: see gmpq.models.search_variants), search on larger "
            "images (data.image_size), choose an earlier loss.attribution_layer, or set loss.eta=0 (EdMIPS)")
    return int(h), int(w)

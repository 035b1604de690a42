"""Apply a policy (or a uniform bit-width) to a DETR's weights through ``gmpq.quant`` and evaluate COCO AP.

Weight-only PTQ: ``apply_policy(model, policy, w_method="symmetric", per_channel=False)`` swaps every quantized
layer for its ``gmpq.quant`` version with the Eq. 6 per-tensor max-abs quantizer; ``a_bits`` is null, so
activations stay full precision and nothing needs calibrating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

import detr_ptq.models.qattention  # noqa: F401  (registers the attention with gmpq.quant)
from detr_ptq.data.coco import CocoDetection, coco_paths
from detr_ptq.data.transforms import DetrTransform, collate
from detr_ptq.engine.evaluate import evaluate
from detr_ptq.models.checkpoint import load_detr
from detr_ptq.ptq.sensitivity import DEFAULT_EXCLUDE, is_excluded
from gmpq.errors import UserError
from gmpq.paths import expand_path
from gmpq.quant.modules import quantizable_layers
from gmpq.quant.policy import apply_policy, layer_bits, uniform_policy


@dataclass
class PTQConfig:
    checkpoint: str = "detr_ptq/assets/detr_tiny_digits.pth"
    config: str = ""  # DETR preset; "" = the config stored in the checkpoint
    coco_dir: str = "runs/digits"  # evaluation folder (COCO layout)
    split: str = "val"
    policy: str = ""  # a policy JSON; "" = uniform w_bits
    w_bits: int = 8  # uniform bit-width when no policy is given
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))  # uniform: kept full precision
    batch_size: int = 8
    min_size: int = 0  # 0 = the checkpoint's training resize, else 800/1333
    max_size: int = 0
    max_images: int = 0  # 0 = every image of the split
    out: str = ""  # metrics JSON; "" = runs/ptq/<policy stem | uniform_wN>.ptq_result.json (never a policy path)
    device: str = "cpu"
    num_threads: int = 1


def load_float(checkpoint: str | Path, config: str = ""):
    """-> (model in eval mode, criterion, postprocessors, DETRConfig)."""
    model, criterion, post, cfg = load_detr(expand_path(checkpoint), config or None, verbose=False)
    return model.eval(), criterion, post, cfg


def uniform_detr_policy(model: nn.Module, model_name: str, w_bits: int, exclude: Sequence[str]) -> dict:
    """Every quantizable layer at ``w_bits`` (weights only), the excluded heads at full precision."""
    keep = tuple(n for n in quantizable_layers(model) if is_excluded(n, exclude))
    return uniform_policy(model, model_name, w_bits, None, keep_full_precision=keep)


def quantize_detr(model: nn.Module, policy: dict, model_name: str | None = None, source: str = "policy"
                  ) -> nn.Module:
    """Weight-only PTQ in place. A policy with activation bits is refused (this is the weight-only path)."""
    bits = layer_bits(policy, model, source)
    with_acts = sorted(n for n, (_, a) in bits.items() if a not in (None, 32))
    if with_acts:
        raise UserError(f"{source} quantizes activations of {with_acts[:5]}{' ...' if len(with_acts) > 5 else ''}; "
                        f"`detr-ptq ptq` is weight-only: set their a_bits to null")
    return apply_policy(model, policy, w_method="symmetric", per_channel=False, source=source,
                        model_name=model_name).eval()


def eval_loader(coco_dir: str | Path, split: str | None, min_size: int, max_size: int, batch_size: int = 8,
                max_images: int = 0) -> tuple[DataLoader, dict]:
    """-> (loader over the split, COCO ground truth restricted to the images it yields)."""
    ann, img_dir, _ = coco_paths(expand_path(coco_dir), split)
    dataset = CocoDetection(img_dir, ann, DetrTransform(min_size, max_size)).first(max_images)
    return DataLoader(dataset, batch_size, shuffle=False, collate_fn=collate), dataset.coco


def evaluate_detr(model: nn.Module, postprocessors: dict, loader: DataLoader, gt: dict, device: str = "cpu") -> dict:
    """COCO box metrics (AP, AP50, ... in [0, 1]) of ``model`` on ``loader``."""
    return evaluate(model.to(device).eval(), postprocessors["bbox"], loader, gt, device)

"""QAT loss terms: DETR's set loss plus Q-DETR's foreground-aware query-matching distillation.

Terms come back as one dict of unweighted tensors; the training engine applies the weights (the criterion's
``weight_dict`` and ``distill_weight``) in the one place where weighting happens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_ptq.qat.align import is_decoder_cross_attention
from detr_ptq.qat.fqm import fqm_distill_loss, pad_targets


class CrossAttentionTap:
    """Records the output of every decoder cross-attention (``[Q, B, E]`` each) during a forward pass.

    ``features()`` -> ``[L, B, Q, E]`` (decoder layer order) and forgets them; ``close()`` removes the hooks.
    Records only while ``active`` (set around the training forward), so evaluation keeps nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        self.active = False
        self._outputs: list[Tensor] = []
        self._hooks = [m.register_forward_hook(self._record) for n, m in model.named_modules()
                       if is_decoder_cross_attention(n)]
        if not self._hooks:
            raise ValueError("the model has no decoder cross-attention (transformer.decoder.layers.N.multihead_attn)")

    def _record(self, module: nn.Module, inputs: tuple, output: tuple) -> None:
        if self.active:
            self._outputs.append(output[0])

    def features(self) -> Tensor:
        feats = torch.stack([o.permute(1, 0, 2) for o in self._outputs])
        self._outputs = []
        return feats

    def start(self) -> None:
        self._outputs, self.active = [], True

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def layer_boxes(outputs: dict) -> Tensor:
    """Predicted boxes of every decoder layer: ``[L, B, Q, 4]`` (auxiliary outputs first, final layer last)."""
    return torch.stack([a["pred_boxes"] for a in outputs.get("aux_outputs", [])] + [outputs["pred_boxes"]])


def distill_term(student_out: dict, teacher_out: dict, student_feats: Tensor, teacher_feats: Tensor,
                 targets: list[dict], tau: float) -> tuple[Tensor, dict[str, float]]:
    """FQM distillation between the decoder cross-attention outputs ``[L, B, Q, E]`` of student and teacher."""
    s_boxes, t_boxes = layer_boxes(student_out), layer_boxes(teacher_out)
    layers = s_boxes.shape[0]  # without auxiliary outputs only the last layer has boxes
    gt, valid = pad_targets(targets, s_boxes.device)
    return fqm_distill_loss(student_feats[-layers:], teacher_feats[-layers:], s_boxes, t_boxes, gt, valid, tau)

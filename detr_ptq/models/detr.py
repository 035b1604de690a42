"""The DETR detector: backbone -> 1x1 input projection -> transformer -> class and box heads."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from detr_ptq.models.backbone import Joiner
from detr_ptq.models.transformer import Transformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (``bbox_embed.layers.{0,1,2}`` in DETR)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DETR(nn.Module):
    """forward(images [B, 3, H, W], mask [B, H, W] bool, True = padding; None = no padding) -> dict:

    ``pred_logits`` [B, Q, num_classes + 1] (last index = no object), ``pred_boxes`` [B, Q, 4] normalized
    (cx, cy, w, h) in [0, 1] relative to the unpadded image, and, when ``aux_loss``, ``aux_outputs``: a list of
    ``num_decoder_layers - 1`` dicts with the same two keys for decoder layers 0 .. L-2.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True) -> None:
        super().__init__()
        hidden = transformer.d_model
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden, num_classes + 1)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        # Quantization hook for the query embeddings (``weight [Q, d]``): parameter-free identity unless QAT
        # installs a weight quantizer (see detr_ptq.qat.quantize); keeps the official state-dict names.
        self.query_quant = nn.Identity()

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict:
        if mask is None:
            b, _, h, w = images.shape
            mask = images.new_zeros((b, h, w), dtype=bool)
        feat, small_mask, pos = self.backbone(images, mask)
        hs = self.transformer(self.input_proj(feat), small_mask, self.query_quant(self.query_embed.weight), pos)[0]
        logits = self.class_embed(hs)  # [L, B, Q, K+1]
        boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

"""Multi-head attention with the ``torch.nn.MultiheadAttention`` parameter names, computed explicitly.

The official DETR checkpoint stores attention as ``in_proj_weight [3E, E]``, ``in_proj_bias [3E]`` and
``out_proj.{weight,bias}``. Keeping those names lets it load with ``strict=True``; computing q, k, v, the
softmax map and the output by hand (instead of calling the fused kernel) exposes every weight and activation to
``gmpq.quant`` and keeps the whole graph twice differentiable (Hessian-vector products).

Quantization hooks: parameter-free submodules, ``nn.Identity`` by default, that ``gmpq.quant`` replaces with
quantizers without editing this file:

    w_quant     applied to ``in_proj_weight`` before use                [3E, E]
    q_in_quant  the query input (DETR: tgt + query_pos)                 [L, B, E]
    k_in_quant  the key input (DETR: memory + pos)                      [S, B, E]
    v_in_quant  the value input (DETR: memory)                          [S, B, E]
    q_norm      projected queries, before q_quant (Q-DETR distribution alignment; identity by default)
    q_quant     projected queries                                       [B, h, L, E/h]
    k_quant     projected keys                                          [B, h, S, E/h]
    attn_quant  softmax attention map                                   [B, h, L, S]
    v_quant     projected values                                        [B, h, S, E/h]

The three inputs are different tensors, so each has its own hook (Q-DETR Eq. 2.26 quantizes them in three
separate fully-connected layers). ``out_proj`` is a plain ``nn.Linear`` so it is quantized like any other linear
layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HOOK_NAMES = ("w_quant", "q_in_quant", "k_in_quant", "v_in_quant", "q_norm", "q_quant", "k_quant", "attn_quant",
              "v_quant")


class MultiheadAttention(nn.Module):
    """Sequence-first attention (``[L, B, E]``, as ``nn.MultiheadAttention(batch_first=False)`` and DETR).

    forward(query [L, B, E], key [S, B, E], value [S, B, E], key_padding_mask [B, S] bool (True = ignore),
    attn_mask [L, S] bool (True = ignore) or float (added)) -> (output [L, B, E], weights [B, L, S]
    averaged over heads).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        for name in HOOK_NAMES:
            setattr(self, name, nn.Identity())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as torch.nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        """[T, B, E] -> [B, h, T, E/h]."""
        t, b, _ = x.shape
        return x.reshape(t, b, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        e = self.embed_dim
        w = self.w_quant(self.in_proj_weight)
        w_q, w_k, w_v = w[:e], w[e:2 * e], w[2 * e:]
        b_q, b_k, b_v = self.in_proj_bias[:e], self.in_proj_bias[e:2 * e], self.in_proj_bias[2 * e:]
        q = self.q_quant(self.q_norm(self._split_heads(F.linear(self.q_in_quant(query), w_q, b_q))))
        k = self.k_quant(self._split_heads(F.linear(self.k_in_quant(key), w_k, b_k)))
        v = self.v_quant(self._split_heads(F.linear(self.v_in_quant(value), w_v, b_v)))

        logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B, h, L, S]
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = self.attn_quant(logits.softmax(dim=-1))
        weights = attn.mean(dim=1)
        attn = F.dropout(attn, p=self.dropout, training=self.training)

        out = torch.matmul(attn, v)  # [B, h, L, E/h]
        b, _, length, _ = out.shape
        out = out.permute(2, 0, 1, 3).reshape(length, b, e)
        return self.out_proj(out), weights

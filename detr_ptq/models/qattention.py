"""Make DETR's ``MultiheadAttention`` quantizable through ``gmpq.quant``.

Importing this module registers the attention with the backend (``register_attention()`` runs at import and is
idempotent); every ``detr_ptq.ptq`` module imports it, so ``detr-ptq sensitivity|allocate|ptq`` always see the
attention layers. Code that builds a DETR and quantizes it elsewhere must ``import detr_ptq.models.qattention``
first, or the attention is not in ``gmpq.quant.quantizable_layers(model)``.

What the registration gives the backend:

- ``quantize_attention(module, spec)`` (the factory): replaces the identity hooks of the module IN PLACE and
  returns the same module (parameter names unchanged, float checkpoints still load):
      w_quant     ``WeightQuantizer(spec.w_bits, spec.w_method, spec.per_channel, out_channels=3E)`` on
                  ``in_proj_weight [3E, E]``
      q_in_quant, k_in_quant, v_in_quant
                  one ``ActQuantizer(spec.a_bits, spec.a_method)`` per input (query, key, value: three different
                  tensors, hence three ranges), batch dimension 1 (sequence-first ``[L, B, E]``)
      q_quant, k_quant, attn_quant, v_quant
                  ``ActQuantizer(spec.get("attn_bits"), spec.a_method)`` on the projected q, k, v and the
                  softmax map (``[B, h, ., .]``, batch dimension 0)
  A hook whose bits are None or 32 stays the parameter-free ``nn.Identity`` (no calibration, no new state).
  Attention operands are quantized only when ``attn_bits`` is given: the consumer decides the default (QAT: the
  activation bits, Q-DETR Eq. 2.26; weight-only PTQ: none).
  ``out_proj`` is an ``nn.Linear`` and is quantized as its own layer (``...self_attn.out_proj``).
- ``quantized_weights()`` -> ``[in_proj_weight]`` and ``macs(inputs, output)`` (per image: the q, k and v
  projections, ``(L + 2 S) E^2``; the two activation-activation matmuls hold no weight and are not counted, so
  BOPs = MACs x w_bits x a_bits stays meaningful), attached to the class so ``gmpq.quant.cost`` can price float
  and quantized attention alike.
"""

from __future__ import annotations

from torch import Tensor, nn

from detr_ptq.models.attention import MultiheadAttention
from gmpq.quant.functional import FULL_PRECISION
from gmpq.quant.modules import LayerSpec, register_quantizable
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer

INPUT_HOOKS = ("q_in_quant", "k_in_quant", "v_in_quant")  # [L or S, B, E]
ACT_HOOKS = ("q_quant", "k_quant", "attn_quant", "v_quant")  # [B, h, ., .]


def quantize_attention(module: MultiheadAttention, spec: LayerSpec) -> MultiheadAttention:
    """Factory for ``gmpq.quant.register_quantizable``: install quantizers per ``spec``; returns ``module``."""
    module.spec = spec
    module.w_quant = WeightQuantizer(spec.w_bits, spec.w_method, spec.per_channel, out_channels=3 * module.embed_dim)
    module.w_quant.init_from(module.in_proj_weight)
    for name in INPUT_HOOKS:
        setattr(module, name, _act_quantizer(spec.a_bits, spec.a_method, batch_dim=1))
    for name in ACT_HOOKS:
        setattr(module, name, _act_quantizer(spec.get("attn_bits"), spec.a_method, batch_dim=0))
    return module.to(module.in_proj_weight.device)


def _act_quantizer(bits: int | None, method: str, batch_dim: int) -> nn.Module:
    """An ``ActQuantizer``, or the parameter-free identity for full precision (None or 32), so weight-only
    quantization adds no parameters (the state dict keeps the float names) and needs no calibration."""
    if bits in (None, FULL_PRECISION):
        return nn.Identity()
    return ActQuantizer(bits, method, batch_dim=batch_dim)


def attention_quantized_weights(self: MultiheadAttention) -> list[nn.Parameter]:
    """The weight tensors whose bit-width the policy sets: ``[in_proj_weight]`` (``out_proj`` is its own layer)."""
    return [self.in_proj_weight]


def attention_macs(self: MultiheadAttention, inputs: tuple, output) -> int:
    """MACs per image of the q/k/v projections: ``(L + 2 S) * E * E``.

    ``inputs`` are the positional forward inputs ``(query [L, B, E], key [S, B, E], value [S, B, E], ...)``.
    """
    query, key = inputs[0], inputs[1]
    value: Tensor = inputs[2] if len(inputs) > 2 else key
    e = self.embed_dim
    return (query.shape[0] + key.shape[0] + value.shape[0]) * e * e


def register_attention() -> None:
    """Register ``MultiheadAttention`` with ``gmpq.quant`` and attach the cost methods (idempotent).

    The methods are only attached when the class does not define them itself, so a native definition in
    ``detr_ptq/models/attention.py`` takes precedence.
    """
    if not hasattr(MultiheadAttention, "quantized_weights"):
        MultiheadAttention.quantized_weights = attention_quantized_weights
    if not hasattr(MultiheadAttention, "macs"):
        MultiheadAttention.macs = attention_macs
    register_quantizable(MultiheadAttention, quantize_attention)


register_attention()

__all__ = ["quantize_attention", "register_attention", "ACT_HOOKS", "INPUT_HOOKS"]

"""The explicit attention equals torch.nn.MultiheadAttention, is twice differentiable, and routes every
quantizable value through its hook submodules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_ptq.models.attention import HOOK_NAMES, MultiheadAttention


def _pair(embed: int = 16, heads: int = 4) -> tuple[MultiheadAttention, nn.MultiheadAttention]:
    ours = MultiheadAttention(embed, heads)
    ref = nn.MultiheadAttention(embed, heads)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same parameter names
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("padding", [False, True])
def test_equals_torch_multihead_attention(padding):
    ours, ref = _pair()
    length, src, batch = 5, 7, 3
    q, k, v = torch.randn(length, batch, 16), torch.randn(src, batch, 16), torch.randn(src, batch, 16)
    mask = None
    if padding:
        mask = torch.zeros(batch, src, dtype=torch.bool)
        mask[1, 4:] = True
        mask[2, 1:] = True
    out, weights = ours(q, k, v, key_padding_mask=mask)
    ref_out, ref_weights = ref(q, k, v, key_padding_mask=mask, need_weights=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    if padding:
        assert (weights[2, :, 1:] == 0).all()


def test_double_backward_hessian_vector_product():
    ours, _ = _pair()
    x = torch.randn(4, 2, 16)
    mask = torch.tensor([[False, False, False, True], [False] * 4])
    params = [ours.in_proj_weight, ours.out_proj.weight]
    loss = ours(x, x, x, key_padding_mask=mask)[0].pow(2).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vec = [torch.randn_like(g) for g in grads]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, vec)), params, create_graph=True)
    assert all(h.shape == p.shape and torch.isfinite(h).all() for h, p in zip(hv, params))
    assert any(h.abs().sum() > 0 for h in hv)
    # Hv is linear in v: H(2v) = 2 Hv.
    hv2 = torch.autograd.grad(sum((g * 2 * u).sum() for g, u in zip(grads, vec)), params, retain_graph=True)
    for a, b in zip(hv, hv2):
        torch.testing.assert_close(2 * a, b)


class _Record(nn.Module):
    """A stand-in quantizer: records the shape of what passes through and scales it."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale, self.shapes, self.seen = scale, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        self.seen.append(x)
        return x * self.scale


def test_hooks_see_every_quantizable_value():
    ours, _ = _pair()
    assert all(isinstance(getattr(ours, n), nn.Identity) for n in HOOK_NAMES)
    assert sum(p.numel() for n in HOOK_NAMES for p in getattr(ours, n).parameters()) == 0
    hooks = {n: _Record() for n in HOOK_NAMES}
    for n, h in hooks.items():
        setattr(ours, n, h)
    q, k, v = torch.randn(5, 2, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    ours(q, k, v)
    assert hooks["w_quant"].shapes == [(48, 16)]
    # Each input has its own quantizer (the three different tensors of a DETR cross-attention).
    for name, x in (("q_in_quant", q), ("k_in_quant", k), ("v_in_quant", v)):
        assert len(hooks[name].seen) == 1 and hooks[name].seen[0] is x
    assert hooks["q_quant"].shapes == [(2, 4, 5, 4)]
    assert hooks["k_quant"].shapes == [(2, 4, 7, 4)] and hooks["v_quant"].shapes == [(2, 4, 7, 4)]
    assert hooks["attn_quant"].shapes == [(2, 4, 5, 7)]


def test_hooks_change_the_output():
    ours, _ = _pair()
    x = torch.randn(3, 1, 16)
    base = ours(x, x, x)[0]
    ours.v_quant = _Record(scale=2.0)  # v enters linearly: doubling v doubles the pre-projection output
    doubled = ours(x, x, x)[0]
    torch.testing.assert_close(doubled - ours.out_proj.bias, 2 * (base - ours.out_proj.bias))

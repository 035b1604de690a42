"""Q-DETR distribution alignment: QueryAlign calibration, training behaviour and installation in DETR."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_ptq.models.attention import MultiheadAttention
from detr_ptq.models.build import build_detr, get_preset
from detr_ptq.qat.align import QueryAlign, install_query_align, is_decoder_cross_attention
from gmpq.errors import UserError
from gmpq.quant.calibrate import calibrate, is_calibrated, require_calibrated


def queries(batch: int = 2, heads: int = 4, length: int = 6, dim: int = 8) -> torch.Tensor:
    """[B, h, L, d] with a different mean and scale per head."""
    shift = torch.arange(heads, dtype=torch.float32).view(1, heads, 1, 1)
    return torch.randn(batch, heads, length, dim) * (1 + shift) + 3 * shift


def calibrated(q: torch.Tensor, init: str = "identity") -> QueryAlign:
    align = QueryAlign(q.shape[1], init=init)
    align.observing = True
    assert align(q) is q
    align.finish_calibration()
    return align


def test_calibrated_module_is_identity(one_thread):
    q = queries()
    align = calibrated(q).eval()
    assert bool(align.initialized) and not align.observing and align._stats == []
    torch.testing.assert_close(align.running_mean, q.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(align(q), q, atol=1e-4, rtol=0)
    # Same batch in training mode: batch stats equal the running stats, so still the identity.
    torch.testing.assert_close(align.train()(q), q, atol=1e-4, rtol=0)


def test_standardize_init_gives_zero_mean_unit_variance_per_head(one_thread):
    """Eq. 2.32 in effect from the start: gamma = 1, beta = 0, so the calibration batch comes out standardized."""
    q = queries()
    align = calibrated(q, "standardize").eval()
    assert torch.equal(align.gamma.detach(), torch.ones(4)) and torch.equal(align.beta.detach(), torch.zeros(4))
    out = align(q)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    # The same affine map as batch norm in eval mode with the same statistics and weight 1, bias 0.
    bn = nn.BatchNorm2d(4, eps=align.eps).eval()
    bn.running_mean.copy_(align.running_mean)
    bn.running_var.copy_(align.running_var)
    torch.testing.assert_close(out, bn(q), atol=1e-6, rtol=1e-6)
    with pytest.raises(UserError, match=r"align_init='bn'.*\['identity', 'standardize'\]"):
        QueryAlign(4, init="bn")


def test_calibration_averages_batches(one_thread):
    qs = [queries(), queries() + 1.0]
    align = QueryAlign(4, init="identity")
    align.observing = True
    for q in qs:
        align(q)
    align.finish_calibration()
    want = torch.stack([q.mean(dim=(0, 2, 3)) for q in qs]).mean(0)
    torch.testing.assert_close(align.running_mean, want)
    torch.testing.assert_close(align.beta.detach(), want)
    want_var = torch.stack([q.var(dim=(0, 2, 3), unbiased=False) for q in qs]).mean(0)
    torch.testing.assert_close(align.gamma.detach(), (want_var + align.eps).sqrt())


def test_training_normalizes_with_batch_stats_and_updates_running(one_thread):
    q = queries()
    align = calibrated(q).train()
    with torch.no_grad():
        align.gamma.fill_(1.0)
        align.beta.zero_()
    before = align.running_mean.clone()
    q2 = q * 2 + 1
    out = align(q2)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(align.running_mean, 0.9 * before + 0.1 * q2.mean(dim=(0, 2, 3)))


def test_gradients_reach_gamma_beta_and_input(one_thread):
    align = calibrated(queries()).train()
    q = queries().requires_grad_(True)
    (align(q) ** 2).sum().backward()
    assert align.gamma.grad is not None and align.gamma.grad.abs().sum() > 0
    assert align.beta.grad is not None and align.beta.grad.abs().sum() > 0
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_uncalibrated_and_empty_calibration_raise():
    align = QueryAlign(4)
    align.name = "dec.q_norm"
    with pytest.raises(UserError, match="not calibrated"):
        align(queries())
    with pytest.raises(UserError, match="dec.q_norm"):
        align.finish_calibration()
    with pytest.raises(ValueError, match="expects"):
        calibrated(queries())(torch.zeros(2, 3, 4, 5))
    assert "num_heads=4" in repr(align)


class Wrapper(nn.Module):
    """Just enough of DETR for the default filter: transformer.decoder.layers.0.multihead_attn."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.Module()
        layer.multihead_attn = MultiheadAttention(16, 4)
        layer.self_attn = MultiheadAttention(16, 4)
        self.transformer = nn.Module()
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.layers = nn.ModuleList([layer])

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        layer = self.transformer.decoder.layers[0]
        return layer.multihead_attn(layer.self_attn(tgt, tgt, tgt)[0], memory, memory)[0]


def test_calibrate_through_gmpq(one_thread):
    model = Wrapper()
    assert install_query_align(model, init="identity") == ["transformer.decoder.layers.0.multihead_attn"]
    align = model.transformer.decoder.layers[0].multihead_attn.q_norm
    assert isinstance(align, QueryAlign) and align.name == "transformer.decoder.layers.0.multihead_attn.q_norm"
    assert isinstance(model.transformer.decoder.layers[0].self_attn.q_norm, nn.Identity)
    batches = [(torch.randn(5, 2, 16), torch.randn(7, 2, 16)) for _ in range(3)]
    with pytest.raises(UserError, match="not calibrated"):
        require_calibrated(model)
    out = calibrate(model, batches, forward=lambda m, b: m(*b))
    assert "transformer.decoder.layers.0.multihead_attn.q_norm" in out
    require_calibrated(model)
    assert is_calibrated(model) and not align.observing
    # In eval mode a freshly calibrated alignment is the identity: the outputs equal the float model's.
    model.eval()
    ref = Wrapper()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "q_norm" not in k})
    with torch.no_grad():
        torch.testing.assert_close(model(*batches[0]), ref.eval()(*batches[0]), atol=1e-5, rtol=0)


def test_install_rejects_no_match_and_double_install():
    model = Wrapper()
    with pytest.raises(UserError, match="no MultiheadAttention"):
        install_query_align(model, lambda name: False)
    assert install_query_align(model, lambda name: name.endswith("self_attn")) == [
        "transformer.decoder.layers.0.self_attn"]
    with pytest.raises(UserError, match="already set"):
        install_query_align(model, lambda name: name.endswith("self_attn"))


def test_install_on_tiny_detr(one_thread):
    cfg = get_preset("detr_tiny")
    model = build_detr(cfg)[0]
    before = set(model.state_dict())
    names = install_query_align(model)
    assert len(names) == cfg.dec_layers and all(is_decoder_cross_attention(n) for n in names)
    added = set(model.state_dict()) - before
    want = {f"{n}.q_norm.{k}" for n in names for k in ("gamma", "beta", "running_mean", "running_var", "initialized")}
    assert added == want and before <= set(model.state_dict())
    assert not is_decoder_cross_attention("transformer.decoder.layers.0.self_attn")
    assert not is_decoder_cross_attention("transformer.decoder.layers.0.multihead_attn.out_proj")

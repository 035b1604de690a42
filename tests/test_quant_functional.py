"""Pure quantizer functions: level counts, ranges, zero guard, STE/LSQ/PACT gradients against hand values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmpq.errors import UserError
from gmpq.quant import functional as F

BITS = [2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_levels_and_range(bits):
    w = torch.linspace(-3, 2, 10_001)
    q = F.symmetric_fake_quant(w, bits)
    step = 3 / (2 ** (bits - 1) - 1)
    levels = torch.unique(q)
    # max|W| = 3 maps to the top code; the grid is symmetric, so 2^b - 1 levels overall, of which those <= 2 appear
    assert q.abs().max().item() == pytest.approx(3.0)
    codes = torch.round(levels / step)
    assert torch.allclose(codes * step, levels, atol=1e-6)
    assert codes.min().item() == -(2 ** (bits - 1) - 1)
    full = F.symmetric_fake_quant(torch.linspace(-3, 3, 10_001), bits)
    assert torch.unique(full).numel() == 2**bits - 1


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_matches_eq6_formula(bits):
    w = torch.randn(64, 3, 3, 3)
    n = 2 ** (bits - 1) - 1
    m = w.abs().max()
    ref = torch.round(w * n / m) * m / n
    assert torch.allclose(F.symmetric_fake_quant(w, bits), ref, atol=1e-6)
    # per output channel: the same formula channel by channel
    mc = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    ref_c = torch.round(w * n / mc) * mc / n
    assert torch.allclose(F.symmetric_fake_quant(w, bits, per_channel=True), ref_c, atol=1e-6)


def test_zero_tensor_and_zero_channel_guard():
    w = torch.zeros(4, 3)
    assert torch.equal(F.symmetric_fake_quant(w, 4), w)
    w[1] = torch.tensor([1.0, -2.0, 0.5])
    q = F.symmetric_fake_quant(w, 4, per_channel=True)
    assert torch.isfinite(q).all()
    assert torch.equal(q[0], torch.zeros(3)) and torch.equal(q[2], torch.zeros(3))


def test_full_precision_is_identity_and_bad_bits_rejected():
    w = torch.randn(5)
    assert F.symmetric_fake_quant(w, 32) is w
    assert F.pact_fake_quant(w, torch.tensor(1.0), 32) is w
    for bad in (1, 9, 16, 0, 4.0, True):
        with pytest.raises(UserError, match=r"accepted values: \[2, 3, 4, 5, 6, 7, 8, 32\]"):
            F.check_bits(bad)


def test_ste_gradient_is_identity():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = F.round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, -2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_symmetric_weight_gradient_is_ste():
    w = torch.randn(8, 4, requires_grad=True)
    F.symmetric_fake_quant(w, 3, per_channel=True).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))


def test_lsq_step_gradient_hand_computed():
    # x, s = 1; qmin, qmax = -4, 3 (3-bit signed). v = x / s.
    x = torch.tensor([0.3, 1.6, -5.0, 4.2])
    s = torch.tensor(1.0, requires_grad=True)
    q = F.lsq_fake_quant(x, s, -4, 3)
    assert torch.equal(q.detach(), torch.tensor([0.0, 2.0, -4.0, 3.0]))
    q.sum().backward()
    g = 1 / math.sqrt(4 * 3)
    # inside: round(v) - v; clamped low: qmin; clamped high: qmax
    expected = ((0 - 0.3) + (2 - 1.6) + (-4) + 3) * g
    assert s.grad.item() == pytest.approx(expected, rel=1e-6)


def test_lsq_input_gradient_masks_clamped_values():
    x = torch.tensor([0.3, 1.6, -5.0, 4.2], requires_grad=True)
    F.lsq_fake_quant(x, torch.tensor(1.0), -4, 3).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_lsq_plus_offset_gradient_hand_computed():
    x = torch.tensor([0.3, 2.6, 9.0])
    s = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(0.5, requires_grad=True)
    q = F.lsq_fake_quant(x, s, 0, 3, offset=b, numel_per_step=3)
    # v = x - 0.5 = [-0.2, 2.1, 8.5] -> codes [0, 2, 3]
    assert torch.allclose(q.detach(), torch.tensor([0.5, 2.5, 3.5]))
    q.sum().backward()
    g = 1 / math.sqrt(3 * 3)
    # -0.2 and 8.5 are clamped (to codes 0 and 3): they contribute qmin=0 and qmax=3; 2.1 contributes round(v)-v
    assert s.grad.item() == pytest.approx((0 + (2 - 2.1) + 3) * g, rel=1e-5)
    # d q / d offset = 1 - d round(clamp(v))/dv * 1: 0 inside the range, 1 where clamped (two values); scaled by g
    assert b.grad.item() == pytest.approx(2 * g, rel=1e-5)


def test_lsq_per_channel_step_and_init():
    w = torch.randn(6, 10)
    step = F.lsq_init_step(w, 7, per_channel=True)
    assert step.shape == (6,)
    assert torch.allclose(step, 2 * w.abs().mean(dim=1) / math.sqrt(7))
    q = F.lsq_fake_quant(w, step, -8, 7)
    codes = q / step[:, None]
    assert torch.allclose(codes, torch.round(codes), atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_pact_levels_unsigned_and_signed(bits):
    x = torch.linspace(-4, 4, 20001)
    alpha = torch.tensor(2.0)
    q = F.pact_fake_quant(x, alpha, bits)
    assert q.min().item() == 0 and q.max().item() == pytest.approx(2.0)
    assert torch.unique(q).numel() == 2**bits
    qs = F.pact_fake_quant(x, alpha, bits, signed=True)
    assert qs.min().item() == pytest.approx(-2.0)
    assert torch.unique(qs).numel() == 2 ** bits - 1


def test_pact_gradients_hand_computed():
    x = torch.tensor([-1.0, 0.4, 1.3, 3.0, 5.0], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    F.pact_fake_quant(x, alpha, 4).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))
    assert alpha.grad.item() == 2.0  # two inputs at or above alpha


def test_codes_roundtrip_is_exact():
    w = torch.randn(16, 8)
    for bits in BITS:
        s = F.symmetric_scale(w, bits, per_channel=True)
        lo, hi = F.signed_range(bits, symmetric=True)
        codes = F.quantize_codes(w, s, lo, hi)
        assert torch.equal(F.dequantize_codes(codes, s), F.symmetric_fake_quant(w, bits, per_channel=True))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), scale=st.floats(1e-3, 1e3), n=st.integers(1, 64))
def test_symmetric_idempotent_and_bounded(bits, scale, n):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale
    q = F.symmetric_fake_quant(w, bits)
    assert q.abs().max() <= w.abs().max() * (1 + 1e-6)
    assert torch.allclose(F.symmetric_fake_quant(q, bits), q, rtol=1e-5, atol=1e-7 * scale)
    # error at most half a step
    step = w.abs().max() / (2 ** (bits - 1) - 1)
    assert (q - w).abs().max() <= step / 2 * (1 + 1e-5)

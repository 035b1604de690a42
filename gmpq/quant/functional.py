"""Pure quantization functions. No modules, no state: every quantizer in the project calls these.

Conventions
- ``bits`` is an int in 2..8, or 32 meaning "not quantized" (the functions then return the input).
- Weight tensors are ``[C_out, ...]``; per-channel statistics are taken over every dim but 0.
- Fake quantization returns float tensors on the quantization grid; rounding uses the straight-through
  estimator (STE) so gradients flow as if rounding were the identity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmpq.errors import UserError

FULL_PRECISION = 32
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, FULL_PRECISION)


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise UserError(f"{what}={bits!r} is not supported; accepted values: {list(ALLOWED_BITS)}")
    return bits


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, identity in the backward pass.

    Written as ``round(x) + (x - x.detach())`` so the forward value is bit-exactly ``round(x)`` (the second
    term is exactly 0); ``x + (round(x) - x).detach()`` can be off by one ulp, which would break the exact
    parity between fake-quant and the exported integer model.
    """
    return torch.round(x).detach() + (x - x.detach())


def clamp_inclusive(x: Tensor, lo: float, hi: float) -> Tensor:
    """``clamp(x, lo, hi)`` whose gradient is 1 on the closed range ``[lo, hi]`` and 0 outside.

    ``torch.clamp`` passes no gradient at the boundary itself, which would freeze the largest weight of every
    max-abs quantized tensor (it sits exactly at ``Qp``).
    """
    return torch.where((x >= lo) & (x <= hi), x, torch.clamp(x, lo, hi).detach())


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Value of ``x`` in the forward pass (bit-exact); gradient multiplied by ``scale`` in the backward (LSQ)."""
    y = x * scale
    return x.detach() + (y - y.detach())


def signed_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range [Qn, Qp]: symmetric gives [-(2^(b-1)-1), 2^(b-1)-1], else [-2^(b-1), 2^(b-1)-1]."""
    qp = 2 ** (bits - 1) - 1
    return (-qp if symmetric else -qp - 1), qp


def unsigned_range(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def _reduce_dims(w: Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


def channel_view(scale: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-output-channel vector ``[C]`` to broadcast against ``like`` ``[C, ...]``."""
    return scale.reshape(-1, *([1] * (like.dim() - 1))) if scale.numel() > 1 else scale.reshape(())


# ---------------------------------------------------------------------------------------------------
# Symmetric linear (max-abs) weight quantizer, Eq. 6 of the output-sensitivity DETR paper:
#   Q(W) = round(W (2^(n-1)-1) / max|W|) * max|W| / (2^(n-1)-1)
# ---------------------------------------------------------------------------------------------------


def symmetric_scale(w: Tensor, bits: int, per_channel: bool = False) -> Tensor:
    """Step size ``max|W| / (2^(n-1)-1)``: a scalar, or ``[C_out]`` when ``per_channel``.

    An all-zero tensor (or channel) gets step 1, so its codes and its quantized values are exactly 0
    instead of 0/0 = NaN.
    """
    qp = 2 ** (bits - 1) - 1
    w = w.detach()
    amax = w.abs().amax(dim=_reduce_dims(w)) if per_channel and w.dim() > 1 else w.abs().max()
    return torch.where(amax > 0, amax / qp, torch.ones_like(amax))


def quantize_codes(w: Tensor, scale: Tensor, qmin: int, qmax: int, offset: Tensor | None = None) -> Tensor:
    """Integer codes ``clamp(round((w - offset) / scale), qmin, qmax)`` (float dtype, no gradient)."""
    s = channel_view(scale, w)
    x = w if offset is None else w - channel_view(offset, w)
    return torch.clamp(torch.round(x / s), qmin, qmax)


def dequantize_codes(codes: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """``codes * scale (+ offset)``: the inverse of ``quantize_codes`` on the grid."""
    out = codes * channel_view(scale, codes)
    return out if offset is None else out + channel_view(offset, codes)


def symmetric_fake_quant(w: Tensor, bits: int, per_channel: bool = False, scale: Tensor | None = None) -> Tensor:
    """Eq. 6 fake quantization with STE rounding. ``scale`` overrides the max-abs step (e.g. a stored one).

    The step is computed from the detached weights, so the gradient w.r.t. ``w`` is the STE identity
    (values already on the grid pass through unchanged).
    """
    if bits == FULL_PRECISION:
        return w
    qmin, qmax = signed_range(bits, symmetric=True)
    s = symmetric_scale(w, bits, per_channel) if scale is None else scale
    sv = channel_view(s, w)
    return round_ste(clamp_inclusive(w / sv, qmin, qmax)) * sv


# ---------------------------------------------------------------------------------------------------
# LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020)
# ---------------------------------------------------------------------------------------------------


def lsq_grad_factor(numel: int, qmax: int) -> float:
    """LSQ gradient scale g = 1 / sqrt(numel * Qp); ``numel`` is the number of values sharing one step."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


def lsq_fake_quant(x: Tensor, step: Tensor, qmin: int, qmax: int, offset: Tensor | None = None,
                   numel_per_step: int | None = None) -> Tensor:
    """``clamp(round((x - offset)/s), qmin, qmax) * s + offset`` with LSQ's scaled step (and offset) gradients.

    ``step`` is a scalar or ``[C]`` (per output channel for weights, dim 0 of ``x``). The gradient w.r.t.
    ``step`` is ``g * (round(v) - v)`` inside the range and ``g * qmin|qmax`` outside it, with
    ``v = (x - offset)/s`` and ``g = 1/sqrt(numel_per_step * qmax)``.
    """
    n = numel_per_step if numel_per_step is not None else (x.numel() // max(step.numel(), 1))
    g = lsq_grad_factor(n, qmax)
    # |s| with a floor: an optimizer step can push a small step through zero (x / 0, or a sign flip that freezes
    # the quantizer); for positive steps this is the identity, gradients included.
    s = channel_view(grad_scale(step, g).abs().clamp_min(1e-8), x)
    b = None if offset is None else channel_view(grad_scale(offset, g), x)
    v = x / s if b is None else (x - b) / s
    q = round_ste(clamp_inclusive(v, qmin, qmax)) * s
    return q if b is None else q + b


def lsq_init_step(x: Tensor, qmax: int, per_channel: bool = False) -> Tensor:
    """LSQ initialisation ``2 * mean|x| / sqrt(Qp)`` (scalar, or ``[C_out]`` per channel)."""
    x = x.detach()
    mean_abs = x.abs().mean(dim=_reduce_dims(x)) if per_channel and x.dim() > 1 else x.abs().mean()
    return (2 * mean_abs / math.sqrt(qmax)).clamp_min(1e-8)


@torch.no_grad()
def mse_step(x: Tensor, qmin: int, qmax: int, per_channel: bool = False, grid: int = 80, lowest: float = 0.1
             ) -> Tensor:
    """The step minimizing ``||x - fq(x)||^2`` among ``r * max|x| / qmax`` for ``r`` in ``[lowest, 1]``
    (``grid`` values), per output channel (dim 0) or per tensor. A better LSQ start than ``lsq_init_step`` at
    2-3 bits, where clipping the largest weights pays. Returns ``[C_out]`` or a scalar, like ``lsq_init_step``.
    """
    x = x.detach()
    dims = _reduce_dims(x) if per_channel and x.dim() > 1 else tuple(range(x.dim()))
    amax = x.abs().amax(dim=dims).clamp_min(1e-8)
    best_err, best = None, amax / qmax
    for r in torch.linspace(lowest, 1.0, grid, dtype=x.dtype).tolist():
        s = amax * r / qmax
        sv = channel_view(s, x) if s.dim() else s
        err = (x - torch.clamp(torch.round(x / sv), qmin, qmax) * sv).pow(2).sum(dim=dims)
        if best_err is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best.clamp_min(1e-8)


@torch.no_grad()
def mse_step_offset(x: Tensor, xmin: float, xmax: float, bits: int, grid: int = 80, lowest: float = 0.1
                    ) -> tuple[Tensor, Tensor]:
    """LSQ+ initialisation minimizing ``mean (x - fq(x))^2`` over the ranges ``r * [xmin, xmax]``, ``r`` in
    ``[lowest, 1]`` (``grid`` values); ``x`` is a sample of observed values (1-D). Clipping a long tail of rare
    large activations is what lets 2-4-bit activations keep resolution where most values are."""
    x = x.detach().float().flatten()
    best = None
    for r in torch.linspace(lowest, 1.0, grid).tolist():
        step, offset = minmax_step_offset(torch.tensor(xmin * r), torch.tensor(max(xmax * r, 1e-4)), bits)
        _, qmax = unsigned_range(bits)
        err = (x - (torch.clamp(torch.round((x - offset) / step), 0, qmax) * step + offset)).pow(2).mean()
        if best is None or err < best[0]:
            best = (err, step, offset)
    return best[1], best[2]


def minmax_step_offset(xmin: Tensor, xmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Asymmetric (LSQ+) initialisation from a range: ``s = (max - min) / (2^b - 1)``, offset ``= min``."""
    _, qmax = unsigned_range(bits)
    s = ((xmax - xmin) / qmax).clamp_min(1e-8)
    return s, xmin


# ---------------------------------------------------------------------------------------------------
# PACT (Choi et al. 2018): learnable clipping level alpha
# ---------------------------------------------------------------------------------------------------


def pact_fake_quant(x: Tensor, alpha: Tensor, bits: int, signed: bool = False) -> Tensor:
    """Clip to ``[0, alpha]`` (or ``[-alpha, alpha]`` if ``signed``) and quantize uniformly.

    Gradients follow the PACT paper: w.r.t. ``x`` it is 1 inside the clipping range and 0 outside; w.r.t.
    ``alpha`` it is 1 where ``x >= alpha`` (-1 where ``x <= -alpha`` if signed) and 0 elsewhere, i.e. the
    rounding error is treated as constant.
    """
    if bits == FULL_PRECISION:
        return x
    alpha = alpha.reshape(())
    if signed:
        y = torch.minimum(torch.maximum(x, -alpha), alpha)
        levels = 2 ** (bits - 1) - 1
    else:
        y = torch.minimum(torch.relu(x), alpha)
        levels = 2**bits - 1
    step = alpha.detach() / levels
    return torch.round(y.detach() / step) * step + (y - y.detach())


def pact_codes(x: Tensor, alpha: Tensor, bits: int, signed: bool = False) -> tuple[Tensor, Tensor]:
    """Integer codes and step of ``pact_fake_quant`` (used by export): ``x_q = codes * step``."""
    alpha = alpha.detach().reshape(())
    levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    lo = -alpha if signed else torch.zeros_like(alpha)
    y = torch.minimum(torch.maximum(x, lo), alpha)
    step = alpha / levels
    return torch.round(y / step), step


# ---------------------------------------------------------------------------------------------------
# ONNX QDQ form: the same grid expressed with torch.fake_quantize_* so the TorchScript ONNX exporter emits
# QuantizeLinear/DequantizeLinear. Low bit-widths are expressed as a Clip to the b-bit range followed by an
# 8-bit Q/DQ pair, which has the same integer grid.
# ---------------------------------------------------------------------------------------------------


def qdq_8bit(x: Tensor, scale: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    """``clamp(x, qmin*s, qmax*s)`` then an int8 (or uint8 if ``qmin >= 0``) Q/DQ pair with step ``scale``.

    ``axis`` selects per-channel steps (``scale`` ``[C]``) along that dim; otherwise ``scale`` is a scalar.
    """
    lo, hi = (0, 255) if qmin >= 0 else (-128, 127)
    if axis is None:
        s = float(scale)
        return torch.fake_quantize_per_tensor_affine(torch.clamp(x, qmin * s, qmax * s), s, 0, lo, hi)
    view = [1] * x.dim()
    view[axis] = -1
    s = scale.reshape(view)
    x = torch.minimum(torch.maximum(x, qmin * s), qmax * s)
    zp = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zp, axis, lo, hi)

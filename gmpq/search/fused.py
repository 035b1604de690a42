"""The mixtures of the mixed layers in one pass, keeping only the float operand for the backward pass.

``mix_pact(x, q, alpha, bits, signed)`` = ``sum_j q_j PACT_{b_j}(x; alpha_j)`` and ``mix_lsq(w, p, steps, bits)`` =
``sum_i p_i Q_{b_i}(W)`` give the values and gradients of the explicit sums in ``gmpq.search.mixed``
(``impl="reference"``), which keep every quantized copy and its clip intermediates alive until the backward pass:
several tensors the size of the input (or weight) per candidate. Here the forward keeps only ``x`` (or ``W``) and
per-candidate scalars; the backward recomputes each candidate once, for ``dL/dq_j = <g, Q_j(x)>``, and gets the other
gradients from signs:

- PACT: with ``u = sign(x - alpha_j)`` (+1 above the clip, 0 on it, -1 below), the reference's gradient factors are
  ``[x > alpha] + 1/2 [x = alpha] = (1 + u) / 2`` for the clip and ``(1 - u) / 2`` for the input (``torch.minimum``
  splits a tie in halves); ``l = sign(x + alpha_j)`` does the same at ``-alpha_j`` when signed; unsigned inputs pass
  no gradient at ``x <= 0`` (``relu``): ``sign(relu(x))``. So ``dalpha_j = q_j (sum g + <g, u>) / 2`` (minus the
  lower clip's share when signed) and ``dx = g sum_j q_j (1 - u_j) / 2`` (times the relu factor).
- Weights: the steps get no gradient (``MixedMixin.weight_step``), so ``dp_i = <g, Q_i(W)>`` and ``dW = g sum_i p_i
  [qmin_i <= W / s_i <= qmax_i]`` (``clamp_inclusive``), the range test done as ``1 - sign(|clamp(v) - v|)``.

Only float arithmetic: on the CPU a boolean mask and its conversion to float cost several plain passes. The forward
values are bit-identical to the reference; the gradients equal it up to floating-point reassociation
(``tests/test_search_fused.py``). A backward with ``create_graph=True`` (autograd Grad-CAM through a mixed layer)
rebuilds the reference graph from the saved operand and differentiates it, so higher derivatives are the reference's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gmpq.quant import functional as QF


def _reference_grads(fn, inputs: tuple[Tensor, ...], const: tuple, g: Tensor) -> list[Tensor | None]:
    """Gradients of ``fn(*inputs, *const)`` w.r.t. ``inputs`` against ``g``, with a graph (for create_graph)."""
    need = [t.requires_grad for t in inputs]
    out = fn(*inputs, *const)
    grads = iter(torch.autograd.grad(out, [t for t, n in zip(inputs, need) if n], g, create_graph=True,
                                     allow_unused=True))
    return [next(grads) if n else None for n in need]


# ---------------------------------------------------------------------------------------------------
# Inputs: PACT candidates
# ---------------------------------------------------------------------------------------------------


def _pact_candidate(x: Tensor, alpha: Tensor, step: Tensor, signed: bool, out: Tensor | None = None) -> Tensor:
    """``PACT(x)`` of one candidate (the reference's values bit for bit), written into ``out`` when given: reusing one
    work buffer across candidates saves an allocation, whose first touch of fresh pages costs more on the CPU than
    the arithmetic."""
    y = torch.clamp_min(x, -alpha if signed else 0.0, out=out) if out is not None else \
        x.clamp_min(-alpha if signed else 0.0)
    return y.clamp_max_(alpha).div_(step).round_().mul_(step)


def _pact_reference(x: Tensor, q: Tensor, alpha: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """The explicit sum, as ``MixedMixin`` computes it with ``impl="reference"`` (used for double backward)."""
    return sum(q[j] * QF.pact_fake_quant(x, alpha[j], b, signed=signed) for j, b in enumerate(bits))


def _pact_grads(x: Tensor, g: Tensor, q: Tensor, alpha: Tensor, step: Tensor, signed: bool, need_x: bool):
    """``(dx, dq, dalpha)`` of ``sum_j q_j PACT_j(x)`` against ``g`` (formulas in the module docstring)."""
    gf = g.reshape(-1)
    g_sum = gf.sum()
    qx = q.to(x.dtype)  # the reference multiplies g by q_j in x's dtype
    buf = torch.empty_like(x)  # work buffers, reused by every candidate
    low = torch.empty_like(x) if signed and need_x else None
    gq, galpha = [], []
    factor, const = None, 0.0  # the input-gradient factor sum_j q_j (...)_j is ``factor + const``
    for j in range(alpha.shape[0]):
        gq.append(torch.dot(gf, _pact_candidate(x, alpha[j], step[j], signed, out=buf).reshape(-1)))
        u = torch.sub(x, alpha[j], out=buf).sign_()
        da = 0.5 * (g_sum + torch.dot(gf, u.reshape(-1)))
        c = 0.5 * qx[j]
        if signed:
            lo = torch.add(x, alpha[j], out=low).sign_() if need_x else torch.add(x, alpha[j]).sign_()
            da = da - 0.5 * (g_sum - torch.dot(gf, lo.reshape(-1)))
            if need_x:  # q_j (1 - u)(1 + l) / 4
                factor = _accumulate(factor, lo.add_(1.0).mul_(u.neg_().add_(1.0)), 0.5 * c)
        elif need_x:  # q_j (1 - u) / 2 = c (1 - u)
            factor = _accumulate(factor, u, -c)
            const = const + c
        galpha.append(qx[j] * da)
    gx = None
    if need_x:
        gx = factor.add_(const)
        if not signed:
            gx.mul_(torch.clamp_min(x, 0.0, out=buf).sign_())
        gx.mul_(g)
    return gx, torch.stack(gq), torch.stack(galpha).to(alpha.dtype)


def _accumulate(acc: Tensor | None, t: Tensor, c: Tensor) -> Tensor:
    """``acc + c t`` in place in ``acc`` (a new tensor ``c t`` when ``acc`` is None: ``t`` is a reused buffer)."""
    return torch.mul(t, c) if acc is None else acc.addcmul_(t, c)


class _MixPact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, alpha: Tensor, bits: tuple[int, ...], signed: bool) -> Tensor:
        with torch.no_grad():
            levels = [2 ** (b - 1) - 1 if signed else 2**b - 1 for b in bits]
            # as the reference's alpha / int; no tensor is built from a list (a host-to-device copy on a GPU)
            step = torch.stack([alpha[j] / lv for j, lv in enumerate(levels)])
            out = _pact_candidate(x, alpha[0], step[0], signed).mul_(q[0])
            buf = torch.empty_like(x) if alpha.shape[0] > 1 else None
            for j in range(1, alpha.shape[0]):  # q_j Q_j(x), summed in the reference's order: bit-identical values
                out.add_(_pact_candidate(x, alpha[j], step[j], signed, out=buf).mul_(q[j]))
        ctx.save_for_backward(x, q, alpha, step)
        ctx.bits, ctx.signed = bits, signed
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, q, alpha, step = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference graph (higher derivatives)
            return (*_reference_grads(_pact_reference, (x, q, alpha), (ctx.bits, ctx.signed), g), None, None)
        with torch.no_grad():
            return (*_pact_grads(x, g, q, alpha, step, ctx.signed, ctx.needs_input_grad[0]), None, None)


def mix_pact(x: Tensor, q: Tensor, alpha: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """``sum_j q_j PACT_{b_j}(x; alpha_j)``, same shape as ``x``. ``q``, ``alpha`` ``[J]`` (differentiable),
    ``bits`` the J candidate bit-widths, ``signed``: clip range ``[-alpha_j, alpha_j]`` (else ``[0, alpha_j]``), a
    Python bool that the caller reads once (reading the quantizers' flag is a host sync on a GPU)."""
    return _MixPact.apply(x, q, alpha, tuple(bits), bool(signed))


# ---------------------------------------------------------------------------------------------------
# Weights: LSQ-grid candidates with fixed per-channel steps
# ---------------------------------------------------------------------------------------------------


def _lsq_candidate(w: Tensor, step: Tensor, bits: int, out: Tensor | None = None) -> Tensor:
    """``Q(W)`` of one candidate on the LSQ grid ``[-2^(b-1), 2^(b-1) - 1]`` with per-channel ``step`` ``[C_out]``
    (the reference's values), written into ``out`` when given (a reused work buffer)."""
    qmin, qmax = QF.signed_range(bits, symmetric=False)
    s = QF.channel_view(step, w)
    v = torch.div(w, s, out=out) if out is not None else w / s
    return v.clamp_(qmin, qmax).round_().mul_(s)


def _lsq_reference(w: Tensor, p: Tensor, steps: Tensor, bits: Sequence[int]) -> Tensor:
    return sum(p[i] * QF.lsq_fake_quant(w, steps[i], *QF.signed_range(b, symmetric=False)) for i, b in enumerate(bits))


class _MixLsq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, p: Tensor, steps: Tensor, bits: tuple[int, ...]) -> Tensor:
        with torch.no_grad():
            s = steps.abs().clamp_min(1e-8)  # as lsq_fake_quant (the identity for positive steps)
            out = _lsq_candidate(w, s[0], bits[0]).mul_(p[0])
            buf = torch.empty_like(w) if len(bits) > 1 else None
            for i in range(1, len(bits)):  # p_i Q_i(W), summed in the reference's order
                out.add_(_lsq_candidate(w, s[i], bits[i], out=buf).mul_(p[i]))
        ctx.save_for_backward(w, p, steps)
        ctx.bits = bits
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        w, p, steps = ctx.saved_tensors
        if torch.is_grad_enabled():
            gw, gp = _reference_grads(_lsq_reference, (w, p), (steps, ctx.bits), g)
            return gw, gp, None, None
        with torch.no_grad():
            s_all, gf, pw = steps.abs().clamp_min(1e-8), g.reshape(-1), p.to(w.dtype)
            v_buf, c_buf = torch.empty_like(w), torch.empty_like(w)
            factor, gp = None, []  # dW = g (sum_i p_i - sum_i p_i o_i), o_i = 1 outside candidate i's range
            for i, b in enumerate(ctx.bits):
                qmin, qmax = QF.signed_range(b, symmetric=False)
                s = QF.channel_view(s_all[i], w)
                v = torch.div(w, s, out=v_buf)
                c = torch.clamp(v, qmin, qmax, out=c_buf)
                if ctx.needs_input_grad[0]:  # clamp_inclusive: gradient 1 on the closed range
                    factor = _accumulate(factor, v.sub_(c).abs_().sign_(), -pw[i])
                gp.append(torch.dot(gf, c.round_().mul_(s).reshape(-1)))
            gw = factor.add_(pw.sum()).mul_(g) if factor is not None else None
        return gw, torch.stack(gp), None, None


def mix_lsq(w: Tensor, p: Tensor, steps: Tensor, bits: Sequence[int]) -> Tensor:
    """``sum_i p_i Q_{b_i}(W)``, same shape as ``w`` ``[C_out, ...]``: ``p`` ``[I]`` (differentiable), per-channel
    steps ``[I, C_out]`` (no gradient), ``bits`` the I candidate bit-widths."""
    return _MixLsq.apply(w, p, steps.detach(), tuple(bits))

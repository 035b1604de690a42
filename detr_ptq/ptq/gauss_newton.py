"""Per-layer Hessian traces as a Gauss-Newton part, probed in output space for every layer at once, plus a residual
part, probed per layer (Hutchinson mode ``gauss-newton``).

For a loss that is a sum of per-row terms of the network's outputs, ``L(W) = sum_n phi(o_n(W), t_n)`` with rows
``o_n`` in R^d (DETR: one row per query and decoder output, the K+1 class logits and the 4 box coordinates; a
classifier: one row of logits per image), the chain rule gives EXACTLY

    H = J^T H_phi J + R,    H_phi = blockdiag_n(d2 phi / do_n2)  [d x d blocks],   R = sum_n g_n . d2 o_n / dW2,

with ``J = do/dW`` and ``g_n = d phi / d o_n``. So per layer ``l``: ``Tr(H_ll) = Tr(J_l^T H_phi J_l) + Tr(R_ll)``.

- Gauss-Newton part: factor each block ``H_phi,n = A+ A+^T - A- A-^T`` (eigendecomposition; eigenvalues within
  ``EIG_RTOL`` of the block's largest are rounding and dropped). For a Rademacher ``z`` in output space
  ``E ||J_l^T A+ z||^2 = Tr(J_l^T A+ A+^T J_l)`` for EVERY layer ``l`` at once, from ONE vector-Jacobian product
  (a first-order backward, no double backward); ``- ||J_l^T A- z'||^2`` likewise (a second backward, only where a
  block has a negative eigenvalue). The sample's variance is Hutchinson's on the same positive semi-definite
  matrix seen from the other side (``B = J_l^T A+``: ``B B^T`` and ``B^T B`` share their non-zero eigenvalues, so
  the ``||.||_F^2`` of the variance formula is the same; only the diagonal correction differs). A positive
  semi-definite ``H_phi`` never gives a negative sample.
- Residual part: ``r(W) = sum_n g_n . o_n(W)`` with ``g`` detached has Hessian ``R``; its per-layer traces come from
  per-layer Hutchinson (``hutchinson.probe_groups``). Where ``g`` is exactly 0 (student == teacher: the
  ``output-float`` sensitivity, whose gradient is 0) ``R = 0`` and this part is skipped: the estimate is then the
  Gauss-Newton part alone, exact in expectation. Elsewhere it is small while the residuals are small (``output-
  quant`` at 8-bit weights; cross-entropy on well-fitted training images), so few probes give its share of the
  error.

Unbiased for every layer (tests/test_ptq_gauss_newton.py: against the exact Hessian of a small model, and
``J^T H_phi J + R`` = the Hessian exactly in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

EIG_RTOL = 1e-6  # |eigenvalue| below this x the block's largest: rounding of a zero eigenvalue, dropped


@dataclass
class RowLoss:
    """A loss written as ``sum_n phi(rows[n], targets[n])``: ``rows`` ``[N, d]`` (with the graph to the traced
    weights), ``targets`` ``[N, d_t]`` (no graph), ``phi(row [d], target [d_t]) -> scalar`` a pure function (it is
    differentiated twice by ``torch.func``). ``minimum_at_target``: ``phi(., t)`` has its minimum at ``t`` (a
    distance such as a distillation loss), so where ``rows == targets`` exactly its gradient is 0 in exact arithmetic
    (computed, it is rounding: about 1e-11 for the DETR distillation loss) and the residual part is 0."""

    rows: Tensor
    targets: Tensor
    phi: Callable[[Tensor, Tensor], Tensor]
    minimum_at_target: bool = False

    def value(self) -> Tensor:
        return torch.func.vmap(self.phi)(self.rows, self.targets).sum()


def output_factors(loss: RowLoss) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(A+ [N, d, d], A- [N, d, d] or None, g [N, d])``: ``A+ A+^T - A- A-^T`` = the Hessian of ``phi`` in each
    row (columns scaled by ``sqrt(|eigenvalue|)``), and ``g`` its gradient; ``A-`` is None where every block is
    positive semi-definite (up to ``EIG_RTOL``)."""
    rows = loss.rows.detach()
    h = torch.func.vmap(torch.func.hessian(loss.phi))(rows, loss.targets)
    g = torch.func.vmap(torch.func.grad(loss.phi))(rows, loss.targets)
    h = (h + h.transpose(1, 2)) / 2
    lam, vec = torch.linalg.eigh(h.double())
    tiny = EIG_RTOL * lam.abs().amax(1, keepdim=True)
    pos = torch.where(lam > tiny, lam, 0.0).sqrt()
    neg = torch.where(lam < -tiny, -lam, 0.0).sqrt()
    a_pos = (vec * pos[:, None, :]).to(rows.dtype)
    a_neg = (vec * neg[:, None, :]).to(rows.dtype) if bool((neg > 0).any()) else None
    return a_pos, a_neg, g


def probe_gauss_newton(rows: Tensor, layers: dict[str, list[Tensor]], factors: tuple[Tensor, Tensor | None],
                       gen: torch.Generator, probes: int) -> dict[str, Tensor]:
    """``{layer: [probes] samples}`` of ``Tr(J_l^T H_phi J_l)`` for every layer, from one batched vector-Jacobian
    product per factor (``is_grads_batched``). ``rows`` keeps its graph (``retain_graph``)."""
    names = list(layers)
    flat = [p for n in names for p in layers[n]]
    out = {n: torch.zeros(probes, dtype=torch.float64) for n in names}
    for sign, a in zip((1.0, -1.0), factors):
        if a is None:
            continue
        z = torch.randint(0, 2, (probes, *a.shape[:2]), generator=gen, dtype=torch.int8).to(a.device, a.dtype) * 2 - 1
        u = torch.einsum("ndr,pnr->pnd", a, z)
        grads = torch.autograd.grad(rows, flat, grad_outputs=u if probes > 1 else u[0], retain_graph=True,
                                    allow_unused=True, is_grads_batched=probes > 1)
        i = 0
        for n in names:
            for g in grads[i:i + len(layers[n])]:
                if g is not None:
                    out[n] += sign * g.reshape(probes, -1).pow(2).sum(1).double().cpu()
            i += len(layers[n])
    return out


def residual_loss(loss: RowLoss, g: Tensor) -> Tensor | None:
    """``sum_n g_n . rows_n`` (``g`` detached): its Hessian is the residual part ``R``; None where ``g`` is 0 (then
    ``R = 0``): exactly, or in exact arithmetic (``minimum_at_target`` and rows equal to the targets)."""
    if not bool(g.ne(0).any()) or (loss.minimum_at_target and torch.equal(loss.rows.detach(), loss.targets)):
        return None
    return (g.detach().to(loss.rows.dtype) * loss.rows).sum()

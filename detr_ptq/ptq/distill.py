"""The multi-layer distillation loss of the output-sensitivity paper (Eq. 5), and the twice-differentiable
version whose Hessian the sensitivity takes.

    L = sum over outputs o in (final, aux_0, ..., aux_{L-2}) of
        lambda_KL * KL(softmax(p_s,o / T) || softmax(p_t,o / T)) + box(b_s,o - b_t,o)

``box`` is the L1 distance of Eq. 5 (``box_loss: l1``) or, where the loss is differentiated twice (the
``output-*`` sensitivities; ``box_loss: smooth_l1``, the default), Smooth-L1 (Huber) with ``box_beta``:

    huber(r) = r^2 / (2 beta)   for |r| < beta,   |r| - beta / 2   otherwise.

Why: |r| is piecewise linear, so autograd's second derivative of the L1 term is 0. At student == teacher
(``output-float``, r = 0) the box term therefore adds nothing to the Hessian, and at the 8-bit weights
(``output-quant``, r != 0) it adds only sum_i sign(r_i) d2 b_i / dW2, an indefinite term with no positive
Gauss-Newton part, which made 35 of the 41 allocated traces of the reference detector negative. Inside the
quadratic zone the Huber Hessian is (J^T J + r . d2b/dW2) / beta: a positive semi-definite Gauss-Newton term plus a
residual term that is small while |r| is small. ``box_beta = 0.02`` (box coordinates are fractions of the image
side) is chosen so that (a) every residual at the traced point falls in the quadratic zone (on the reference
detector the largest |r| at W_q8 is 0.012, the 99th percentile 0.007), and (b) the surrogate equals L1 at
|r| = 2 beta = 0.04, the size of the box moves that the bit-widths being allocated cause (4-bit weights: median
|r| 0.015, 90th percentile 0.047), so the box term keeps about the weight Eq. 5 gives it. A squared error would
do the same inside the zone, but without the cap on large residuals. The value of Eq. 5 itself (with L1) is what
``loss_value`` reports.

Queries are matched by index (no Hungarian matching): the student's query i is compared with the teacher's
query i. Reductions: the KL is summed over the K+1 classes and averaged over the B x Q queries; the box terms are
summed over the 4 box coordinates and averaged over the B x Q queries.

At student == teacher the value is 0 and so is the gradient (KL has its minimum there, and so has the Huber
term), but the Hessian is not: the KL term's Hessian at its minimum is the Fisher-like matrix
J^T (diag(p) - p p^T) J / T^2 and the Huber term's is J_b^T J_b / beta, both positive semi-definite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_ptq.ptq.gauss_newton import RowLoss

BOX_LOSSES = ("smooth_l1", "l1")


@dataclass
class DistillConfig:
    temperature: float = 6.0
    lambda_kl: float = 0.05
    box_loss: str = "smooth_l1"  # smooth_l1 (twice differentiable, for Hessians) | l1 (Eq. 5 as written)
    box_beta: float = 0.02  # Smooth-L1 quadratic zone, in box coordinates (fractions of the image side)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss={self.box_loss!r} is unknown; accepted: {list(BOX_LOSSES)}")
        if self.box_beta <= 0:
            raise ValueError(f"box_beta={self.box_beta} must be > 0")


def _outputs(out: dict) -> list[dict]:
    return [out] + list(out.get("aux_outputs", []))


def kl_student_teacher(logits_s: Tensor, logits_t: Tensor, temperature: float) -> Tensor:
    """KL(softmax(s/T) || softmax(t/T)) for logits ``[B, Q, K+1]``: summed over classes, mean over B x Q."""
    log_ps = F.log_softmax(logits_s / temperature, dim=-1)
    log_pt = F.log_softmax(logits_t / temperature, dim=-1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()


def box_l1(boxes_s: Tensor, boxes_t: Tensor) -> Tensor:
    """|b_s - b_t| for boxes ``[B, Q, 4]``: summed over coordinates, mean over B x Q."""
    return (boxes_s - boxes_t).abs().sum(-1).mean()


def box_smooth_l1(boxes_s: Tensor, boxes_t: Tensor, beta: float) -> Tensor:
    """Huber(b_s - b_t; beta) for boxes ``[B, Q, 4]``: summed over coordinates, mean over B x Q."""
    return F.smooth_l1_loss(boxes_s, boxes_t, reduction="none", beta=beta).sum(-1).mean()


def distill_terms(student: dict, teacher: dict, temperature: float = 6.0, box_beta: float = 0.02
                  ) -> dict[str, Tensor]:
    """Unweighted terms ``{"kl", "l1", "smooth_l1"}`` (each summed over the final and every auxiliary output) and
    ``{"kl_i", "l1_i", "smooth_l1_i"}`` per output (i = 0 final, 1.. auxiliary). ``teacher`` should be detached."""
    s_outs, t_outs = _outputs(student), _outputs(teacher)
    if len(s_outs) != len(t_outs):
        raise ValueError(f"student has {len(s_outs)} outputs (final + aux), teacher {len(t_outs)}")
    terms: dict[str, Tensor] = {}
    for i, (s, t) in enumerate(zip(s_outs, t_outs)):
        terms[f"kl_{i}"] = kl_student_teacher(s["pred_logits"], t["pred_logits"], temperature)
        terms[f"l1_{i}"] = box_l1(s["pred_boxes"], t["pred_boxes"])
        terms[f"smooth_l1_{i}"] = box_smooth_l1(s["pred_boxes"], t["pred_boxes"], box_beta)
    n = len(s_outs)
    for k in ("kl", "l1", "smooth_l1"):
        terms[k] = sum(terms[f"{k}_{i}"] for i in range(n))
    return terms


def distill_loss(student: dict, teacher: dict, cfg: DistillConfig | None = None, box_loss: str | None = None
                 ) -> Tensor:
    """``lambda_KL * kl + box`` (the one place where the terms are weighted); ``box`` is ``cfg.box_loss``
    unless ``box_loss`` overrides it (``"l1"`` gives Eq. 5 as written)."""
    cfg = cfg or DistillConfig()
    box = box_loss or cfg.box_loss
    if box not in BOX_LOSSES:
        raise ValueError(f"box_loss={box!r} is unknown; accepted: {list(BOX_LOSSES)}")
    terms = distill_terms(student, teacher, cfg.temperature, cfg.box_beta)
    return cfg.lambda_kl * terms["kl"] + terms[box]


def box_residuals(student: dict, teacher: dict) -> Tensor:
    """|b_s - b_t| over every output, query and coordinate, flattened (to check the Huber zone)."""
    return torch.cat([(s["pred_boxes"] - t["pred_boxes"]).abs().flatten()
                                    for s, t in zip(_outputs(student), _outputs(teacher))])


def distill_rows(student: dict, teacher: dict, cfg: DistillConfig | None = None) -> RowLoss:
    """The twice-differentiable ``distill_loss`` (``box_loss: smooth_l1``) as per-row terms for the Gauss-Newton
    trace estimator: one row per output, image and query, ``[K+1 logits, 4 box coordinates]``; ``phi`` is that
    query's ``lambda_KL * KL + Huber`` divided by B x Q, so the rows' sum is ``distill_loss`` (the L1 of Eq. 5 has no
    second derivative and is refused)."""
    cfg = cfg or DistillConfig()
    if cfg.box_loss != "smooth_l1":
        raise ValueError(f"box_loss={cfg.box_loss!r} has no second derivative; the row form needs 'smooth_l1'")
    s_outs, t_outs = _outputs(student), _outputs(teacher)
    b, q, k1 = s_outs[0]["pred_logits"].shape
    rows = torch.cat([torch.cat([s["pred_logits"], s["pred_boxes"]], -1).reshape(b * q, k1 + 4) for s in s_outs])
    targets = torch.cat([torch.cat([t["pred_logits"], t["pred_boxes"]], -1).reshape(b * q, k1 + 4)
                         for t in t_outs]).detach()
    temp, lam, beta, scale = cfg.temperature, cfg.lambda_kl, cfg.box_beta, 1.0 / (b * q)

    def phi(row: Tensor, target: Tensor) -> Tensor:
        log_ps = F.log_softmax(row[:k1] / temp, -1)
        log_pt = F.log_softmax(target[:k1] / temp, -1)
        d = row[k1:] - target[k1:]  # squared as is: through |d| the second derivative at d = 0 would be sign(0)^2 = 0
        huber = torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta)
        return scale * (lam * (log_ps.exp() * (log_ps - log_pt)).sum() + huber.sum())
    return RowLoss(rows, targets, phi, minimum_at_target=True)

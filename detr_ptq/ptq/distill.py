"""The multi-layer distillation loss of the output-sensitivity paper (Eq. 5).

    L = sum over outputs o in (final, aux_0, ..., aux_{L-2}) of
        lambda_KL * KL(softmax(p_s,o / T) || softmax(p_t,o / T)) + L1(b_s,o - b_t,o)

Queries are matched by index (no Hungarian matching): the student's query i is compared with the teacher's
query i. Reductions: the KL is summed over the K+1 classes and averaged over the B x Q queries; the L1 is summed
over the 4 box coordinates and averaged over the B x Q queries.

At student == teacher the value is 0 and so is the gradient (KL has its minimum there; torch differentiates
|x| at 0 as 0), but the Hessian is not: the KL term's Hessian at its minimum is the Fisher-like matrix
J^T (diag(p) - p p^T) J / T^2, positive semi-definite and non-zero. (The L1 term is piecewise linear, so its
Hessian is 0 almost everywhere.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass
class DistillConfig:
    temperature: float = 6.0
    lambda_kl: float = 0.05

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")


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


def distill_terms(student: dict, teacher: dict, temperature: float = 6.0) -> dict[str, Tensor]:
    """Unweighted terms ``{"kl", "l1"}`` (each summed over the final and every auxiliary output) and
    ``{"kl_i", "l1_i"}`` per output (i = 0 final, 1.. auxiliary). ``teacher`` should be detached."""
    s_outs, t_outs = _outputs(student), _outputs(teacher)
    if len(s_outs) != len(t_outs):
        raise ValueError(f"student has {len(s_outs)} outputs (final + aux), teacher {len(t_outs)}")
    terms: dict[str, Tensor] = {}
    for i, (s, t) in enumerate(zip(s_outs, t_outs)):
        terms[f"kl_{i}"] = kl_student_teacher(s["pred_logits"], t["pred_logits"], temperature)
        terms[f"l1_{i}"] = box_l1(s["pred_boxes"], t["pred_boxes"])
    n = len(s_outs)
    terms["kl"] = sum(terms[f"kl_{i}"] for i in range(n))
    terms["l1"] = sum(terms[f"l1_{i}"] for i in range(n))
    return terms


def distill_loss(student: dict, teacher: dict, cfg: DistillConfig | None = None) -> Tensor:
    """Eq. 5: ``lambda_KL * kl + l1`` (the one place where the terms are weighted)."""
    cfg = cfg or DistillConfig()
    terms = distill_terms(student, teacher, cfg.temperature)
    return cfg.lambda_kl * terms["kl"] + terms["l1"]

"""GMPQ search losses. Each function returns one named term; ``gmpq.runtime.terms.weighted_total`` applies the
weights in the one place (the training engine):

    total = ce + zeta * complexity + eta * attribution

- ``ce``: cross-entropy of the hypernet logits.
- ``complexity`` R_C = sum_k MACs_k E[q_w,k] E[q_a,k] / (sum_k MACs_k 32 32) over the searched layers (expected
  BOPs relative to the same layers in float); in ``target`` mode ``relu(expected_bops - budget) / (sum_k MACs_k 32
  32)``, zero at or below the budget (expected BOPs then include the fixed full-precision layers, like the policy's
  ``summary.bops``).
- ``attribution`` R_G: capacity-aware attribution imitation (the paper's form). Over the top-k pixels of the
  teacher map ``M_f``: target ``M_f^p``, student ``M_s``, each normalised to MEAN 1 over those k pixels; the loss is
  the mean squared difference (mean over the k pixels and the batch). With mean-1 maps its size does not depend on
  k or on the input size (a sum-1 normalisation made it scale as 1/k: ~1e-3 at k = 1000).
  ``p = mean_k (Qw0 / E[q_w,k]) (Qa0 / E[q_a,k])`` (detached): low-capacity nets imitate a flatter map.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12
BITS_FLOAT = 32


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(logits, labels)


def expected_bops(ebits: dict[str, tuple[Tensor, Tensor]], macs: dict[str, int]) -> Tensor:
    """sum_k MACs_k E[q_w,k] E[q_a,k] over the searched layers (BOPs per image, differentiable)."""
    return sum(macs[n] * ew * ea for n, (ew, ea) in ebits.items())


def complexity_loss(ebits: dict[str, tuple[Tensor, Tensor]], macs: dict[str, int], mode: str = "penalty",
                    target_bops: float | None = None, fixed_bops: float = 0.0) -> Tensor:
    """R_C (dimensionless). ``target_bops``/``fixed_bops`` (per image) are used in ``target`` mode only."""
    norm = float(sum(macs[n] for n in ebits)) * BITS_FLOAT * BITS_FLOAT
    bops = expected_bops(ebits, macs)
    if mode == "penalty":
        return bops / norm
    if mode == "target":
        return torch.relu(bops + fixed_bops - target_bops) / norm
    raise ValueError(f"complexity mode {mode!r}; accepted values: ['penalty', 'target']")


def capacity_p(ebits: dict[str, tuple[Tensor, Tensor]], qw0: float = 4.0, qa0: float = 6.0) -> Tensor:
    """Capacity-aware exponent ``p = mean_k (qw0 / E[q_w,k]) (qa0 / E[q_a,k])`` (scalar, detached)."""
    terms = [(qw0 / ew) * (qa0 / ea) for ew, ea in ebits.values()]
    return torch.stack(terms).mean().detach()


def attribution_loss(student_map: Tensor, teacher_map: Tensor, p: Tensor | float, topk: int = 1000) -> Tensor:
    """R_G for maps ``[N, H, W]`` at input resolution; ``k = min(topk, H W)`` pixels chosen on the teacher map.

    Dimensionless: both maps are scaled to mean 1 over the k pixels, so R_G is the mean squared relative deviation.
    """
    s = student_map.flatten(1)
    t = teacher_map.detach().flatten(1).clamp_min(0)
    k = min(topk, t.shape[1])
    idx = t.topk(k, dim=1).indices
    t_k = t.gather(1, idx)
    # divide by the max first: (t/max)^p normalises to the same target as t^p, without overflow or underflow
    t_k = (t_k / (t_k.amax(dim=1, keepdim=True) + EPS)) ** p
    target = t_k / (t_k.mean(dim=1, keepdim=True) + EPS)
    s_k = s.gather(1, idx)
    pred = s_k / (s_k.mean(dim=1, keepdim=True) + EPS)
    return ((pred - target) ** 2).mean()


def loss_weights(zeta: float, eta: float) -> dict[str, float]:
    return {"ce": 1.0, "complexity": zeta, "attribution": eta}


def grad_shares(norms: dict[str, float]) -> dict[str, float]:
    """Each term's fraction of the summed gradient norms (``term_grad_norms``); all 0 when every norm is 0."""
    total = sum(norms.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in norms.items()}

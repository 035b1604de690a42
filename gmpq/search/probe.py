"""Show that every loss term acts: the gradient norm each weighted term sends to the importance logits.

    norms = logit_grad_norms(state, x, y)        # {"ce": .., "complexity": .., "attribution": ..}
    grad_shares(norms)                           # the same as fractions of their sum

``scripts/grad_shares.py`` prints them for a recipe (the default eta was chosen with it, ``docs/search.md``);
the search loop logs them once per epoch (``grad_<term>`` in ``log.jsonl``, ``epoch/grad_<term>`` in TensorBoard).
"""

from __future__ import annotations

import torch

from gmpq.runtime.terms import term_grad_norms
from gmpq.search import losses as L
from gmpq.search.hypernet import arch_parameters


def logit_grad_norms(state, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Gradient norm of each weighted loss term w.r.t. the importance logits on one batch ``x [N, C, H, W]``,
    ``y [N]``. ``state`` is the search's ``SearchState``; the model's gradients are left untouched."""
    from gmpq.search.train import compute_losses  # the loop's own loss: measure exactly what it optimises

    terms, _ = compute_losses(state, x, y)
    weights = L.loss_weights(state.cfg.loss.zeta, state.cfg.loss.eta)
    return term_grad_norms(terms, weights, arch_parameters(state.model))


def mean_logit_grad_norms(state, batches, device: torch.device | str = "cpu") -> dict[str, float]:
    """``logit_grad_norms`` averaged over ``batches`` (an iterable of ``(x, y)``)."""
    sums: dict[str, float] = {}
    n = 0
    for x, y in batches:
        for k, v in logit_grad_norms(state, x.to(device), y.to(device)).items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}

"""Loss terms: the one place where named terms are weighted, and the gradient each weighted term sends.

Every stage returns a dict of named, unweighted terms; the training engine (and the analyses that need a total,
such as the Hessian of the DETR loss) combine them with ``weighted_total``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def weighted_total(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """``sum(weights[k] * terms[k])`` over the terms that have a weight (the others are logged only)."""
    return sum(terms[k] * weights[k] for k in terms if k in weights)


def term_grad_norms(terms: dict[str, Tensor], weights: dict[str, float], params: list[Tensor]) -> dict[str, float]:
    """L2 norm of the gradient that each weighted term (``weights[k] * terms[k]``) sends to ``params`` (e.g. the
    search's importance logits), ``{term: norm}`` for the terms that have a weight; a term with weight 0 or no path
    to ``params`` gives 0.0. One extra backward per term (graphs retained): measure now and then, not every step."""
    out = {}
    for name, w in weights.items():
        if name not in terms:
            continue
        term = terms[name]
        if w == 0 or not term.requires_grad:
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(term * w, params, retain_graph=True, allow_unused=True)
        out[name] = float(sum((g.double() ** 2).sum() for g in grads if g is not None) ** 0.5) if any(
            g is not None for g in grads) else 0.0
    return out

"""Groups of layers that ONE Hessian-vector product can probe together, chosen from measured cross-block norms.

Probing a group ``G`` with an independent Rademacher vector ``v_l`` on each of its layers gives, for each ``l`` in
``G``, the sample ``v_l . (H v_G)_l = v_l^T H_ll v_l + sum_{m in G, m != l} v_l^T H_lm v_m``. The cross terms have
mean 0 (``v_l`` and ``v_m`` are independent), so the sample's mean is still ``Tr(H_ll)``; they are uncorrelated
with each other and with the diagonal term, each with variance ``||H_lm||_F^2``. So the variance of layer l's
sample is its per-layer (PyHessian) variance ``Var_l = 2 (||H_ll||_F^2 - sum_i (H_ll)_ii^2)`` times the inflation
``1 + sum_{m in G, m != l} ||H_lm||_F^2 / Var_l``, while one product serves the whole group.

- ``cross_block_norms``: the pilot. Two probes ``v_m`` per layer ``m`` and the columns ``H v_m`` over the layers
  between m and the loss (so it costs one per-layer step of two probes): ``||(H v_m)_l||^2`` has mean
  ``||H_lm||_F^2``, and the two probes' ``v ⊙ H v`` give ``sum_i (H_ll)_ii^2``, hence ``Var_l``.
- ``graph_reach``: the cost model. The double backward of a group's gradients walks the autograd graph between
  its layers and the loss, so a group costs about the summed size of the graph nodes from which one of its layers
  is reachable (deterministic: the grouping does not depend on timings, so the same seed gives the same
  estimate).
- ``group_layers``: greedy: merge the two groups whose walks share the most (the work saved), as long as no
  member's inflation exceeds ``max_inflation``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def cross_block_norms(loss: Tensor, layers: dict[str, list[Tensor]], probes: dict[str, list[Tensor]],
                      walk: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(F [L, L], var [L])`` from ``P`` >= 2 Rademacher probes per layer (``probes[m]``: ``[P, *shape]`` per
    tensor, on layer ``m`` alone, batched in one double backward).

    ``F[l, m]``: the mean over the probes of ``||(H v_m)_l||^2``, an unbiased estimate of ``||H_lm||_F^2``
    (``F[m, l]`` estimates the same; where both are measured they are averaged). ``var[l]``: the per-layer
    Hutchinson variance ``2 (||H_ll||_F^2 - sum_i (H_ll)_ii^2)``: ``(v ⊙ H v)_i`` has mean ``(H_ll)_ii``, so the
    product of two independent probes' values estimates ``(H_ll)_ii^2`` (clamped at 0; a block whose variance
    comes out 0 is grouped only with layers it has no cross term with). ``loss`` must have a graph through
    every tensor of ``layers``.

    ``walk`` (``[L]``, each layer's double-backward cost, e.g. ``graph_reach``'s weights summed): layer m's product
    then only asks for the layers whose walk is no longer than m's, i.e. those between m and the loss, so it
    stops at m instead of walking the whole graph (every pair is still measured once, from its lower layer).
    """
    names = list(layers)
    owner = [i for i, n in enumerate(names) for _ in layers[n]]
    flat = [p for n in names for p in layers[n]]
    grads = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)
    f, seen, var = np.zeros((len(names), len(names))), np.zeros((len(names), len(names))), np.zeros(len(names))
    for m, n in enumerate(names):
        live = [j for j, o in enumerate(owner) if o == m and grads[j] is not None and grads[j].requires_grad]
        if not live:
            continue
        start = owner.index(m)
        wanted = [j for j, o in enumerate(owner) if walk is None or walk[o] <= walk[m]]
        hv = torch.autograd.grad([grads[j] for j in live], [flat[j] for j in wanted], retain_graph=True,
                                 grad_outputs=[probes[n][j - start] for j in live], allow_unused=True,
                                 is_grads_batched=True)
        diag = []  # per tensor of layer m: [P, n] values v ⊙ H v
        for j, h in zip(wanted, hv):
            seen[owner[j], m] = 1
            if h is not None:
                f[owner[j], m] += float(h.double().flatten(1).pow(2).sum(1).mean())
                if owner[j] == m:
                    diag.append((probes[n][j - start] * h).double().flatten(1))
        if diag:
            d = torch.cat(diag, 1)
            pairs = [(p, q) for p in range(len(d)) for q in range(p + 1, len(d))]
            square_diag = sum(float(d[p] @ d[q]) for p, q in pairs) / len(pairs)
            var[m] = max(2 * (f[m, m] - square_diag), 0.0)
    return (f + f.T) / np.maximum(seen + seen.T, 1), var


def graph_reach(loss: Tensor, layers: dict[str, list[Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """``(reach [L, N] bool, weight [N])`` over the ``N`` autograd nodes of ``loss``'s graph: ``reach[l, i]`` when
    one of layer l's tensors is reachable from node ``i`` (the part of the graph a double backward for that layer
    walks); ``weight[i]`` = 1 + the number of elements of the node's forward outputs, a proxy of its backward
    cost (a 56 x 56 feature map costs more than a 100-token embedding)."""
    tensor_layer = {id(p): i for i, ps in enumerate(layers.values()) for p in ps}
    below: dict = {}  # node -> bitset of the layers reachable from it
    stack = [(loss.grad_fn, False)]
    while stack:  # iterative post-order DFS (graphs are deep)
        node, done = stack.pop()
        if node is None or (not done and node in below):
            continue
        if not done:
            stack.append((node, True))
            stack += [(nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in below]
            continue
        mask = 1 << tensor_layer[id(node.variable)] if id(getattr(node, "variable", None)) in tensor_layer else 0
        for nxt, _ in node.next_functions:
            if nxt is not None:
                mask |= below[nxt]
        below[node] = mask
    reach = np.zeros((len(layers), len(below)), dtype=bool)
    for i, mask in enumerate(below.values()):
        reach[:, i] = [(mask >> layer) & 1 for layer in range(len(layers))]
    weight = np.array([1.0 + sum(math.prod(m.shape) for m in getattr(node, "_input_metadata", ()))
                       for node in below], dtype=float)
    return reach, weight


def group_layers(f: np.ndarray, var: np.ndarray, reach: np.ndarray, weight: np.ndarray, max_inflation: float
                 ) -> list[list[int]]:
    """Greedy grouping (layer indices, each group in increasing order, groups by their first layer).

    ``f``, ``var``: ``cross_block_norms``; ``reach``, ``weight``: ``graph_reach``. Two groups merge when every
    member's inflation ``1 + sum_m f[l, m] / var[l]`` over its new group stays <= ``max_inflation``, the pair
    whose walks share the most weight of graph nodes (the work saved) first; a layer with ``var = 0`` only joins
    layers it has no cross term with. ``max_inflation = 1`` merges only layers with no cross term at all (no
    variance cost)."""
    n = len(reach)
    reach = reach.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(f > 0, f / var[:, None], 0.0)  # c[l, m]: inflation layer m adds to layer l
    np.fill_diagonal(c, 0.0)
    groups = [[i] for i in range(n)]
    infl = np.ones(n)
    s = c.copy()  # s[l, g]: sum of c[l, m] over the members m of group g
    while len(groups) > 1:
        slack = max_inflation - infl  # [n]
        worst = np.stack([(s[g] - slack[g, None]).max(0) for g in groups])  # [G, G]: worst member of a with b
        ok = (worst <= 1e-12) & (worst.T <= 1e-12)
        np.fill_diagonal(ok, False)
        shared = (reach * weight) @ reach.T  # [G, G]: node weight walked by both
        shared[~ok] = -1
        a, b = np.unravel_index(int(np.argmax(shared)), shared.shape)
        if shared[a, b] <= 0:
            break
        a, b = min(a, b), max(a, b)
        infl[groups[a]] += s[groups[a], b]
        infl[groups[b]] += s[groups[b], a]
        s[:, a] += s[:, b]
        s = np.delete(s, b, axis=1)
        groups[a] = sorted(groups[a] + groups.pop(b))
        reach[a] = np.maximum(reach[a], reach[b])
        reach = np.delete(reach, b, axis=0)
    return groups

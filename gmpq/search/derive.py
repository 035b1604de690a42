"""Budget-exact policies from a search: the most probable bit-widths whose cost fits the user's budget.

The argmax of the importance logits ignores the budget (it lands 15-20 % above it in our runs). Instead, for the
searched layers ``l`` and their candidate pairs ``(w_i, a_j)``, solve exactly (HiGHS ``milp``)

    maximise    sum_l log P_l(w_i) + log P_l(a_j)          (the search's probabilities, softmax of the logits)
    subject to  one pair per layer,
                fixed_bops + sum_l MACs_l w_i a_j <= budget            (BOPs per image; and/or)
                fixed_size_bits + sum_l params_l w_i <= size budget    (model size in bits)

``fixed_*`` are the layers that stay in full precision (first conv, classifier) and, for size, every other
parameter; with ``convention="quantized"`` the BOPs budget covers the searched layers only (the papers' tables).
A budget below the all-minimum-bits cost raises a ``UserError`` with the feasible range.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import LinearConstraint

from gmpq.errors import UserError
from gmpq.quant.milp import solve_exact
from gmpq.quant.policy import make_policy

LOG_FLOOR = 1e-12  # a probability of exactly 0 (underflow) still gets a finite cost
CONVENTIONS = ("whole", "quantized")


def _searched(policy: dict) -> dict[str, dict]:
    layers = {n: e for n, e in policy["layers"].items() if "w_probs" in e}
    if not layers:
        raise UserError("the policy has no searched layers (entries with w_probs/a_probs): derive needs the "
                        "policy.json written by `gmpq search`")
    return layers


def _pairs(e: dict) -> list[tuple[int, int, float]]:
    """``[(w_bits, a_bits, -log P)]`` of one searched layer (all candidate pairs)."""
    return [(w, a, -math.log(max(pw, LOG_FLOOR)) - math.log(max(pa, LOG_FLOOR)))
            for w, pw in zip(e["w_candidates"], e["w_probs"]) for a, pa in zip(e["a_candidates"], e["a_probs"])]


def fixed_bops(policy: dict) -> float:
    """BOPs per image of the layers that are not searched (MACs x w_bits x a_bits, 32 for a float side)."""
    total = 0.0
    for name, e in policy["layers"].items():
        if "w_probs" in e:
            continue
        if "macs" not in e:
            raise UserError(f"policy layer {name!r} has no 'macs': derive needs a policy written by `gmpq search`")
        total += e["macs"] * e["w_bits"] * (e["a_bits"] or 32)
    return total


def solve_policy_ilp(costs: list[np.ndarray], rows: list[tuple[str, list[np.ndarray], float, str]],
                     time_limit: float = 60.0, lower: dict[str, float] | None = None) -> list[int]:
    """Pick one option per layer minimising ``sum costs``; ``rows``: ``(name, per-layer coefficients, upper bound,
    feasible-range text)``; ``lower``: optional lower bounds by row name. Returns the chosen option index per layer.
    Pure numpy / HiGHS."""
    lower = lower or {}
    sizes = [len(c) for c in costs]
    n = sum(sizes)
    excess = np.concatenate([c - c.min() for c in costs])  # a per-layer constant does not change the argmin
    starts = np.cumsum([0] + sizes[:-1])
    one_hot = np.zeros((len(costs), n))
    for k, (s, m) in enumerate(zip(starts, sizes)):
        one_hot[k, s:s + m] = 1
    cons = [LinearConstraint(one_hot, 1, 1)]
    for name, coef, ub, feasible in rows:
        row = np.concatenate(coef)
        if sum(float(cf.min()) for cf in coef) > ub * (1 + 1e-12):
            raise UserError(f"the {name} budget is infeasible: {feasible}")
        scale = max(abs(ub), 1e-300)  # coefficients O(1), like the objective
        lb = lower.get(name, -np.inf)
        if lb > sum(float(cf.max()) for cf in coef):
            raise UserError(f"the lower {name} bound is above the all-maximum-bits cost: {feasible}")
        cons.append(LinearConstraint(row[None, :] / scale, lb / scale, ub / scale))
    _, res = solve_exact(excess, cons, time_limit, "relax the budget (see `gmpq cost` for the feasible range)")
    x = np.round(res.x)
    choice = [int(np.argmax(x[s:s + m])) for s, m in zip(starts, sizes)]
    for name, coef, ub, _ in rows:  # exact check in float64: never hand back a policy over the budget
        used = sum(float(cf[j]) for cf, j in zip(coef, choice))
        if used > ub * (1 + 1e-9) or used < lower.get(name, -np.inf) * (1 - 1e-9):
            raise UserError(f"the ILP solution exceeds the {name} budget ({used:.6g} > {ub:.6g}); please report")
    return choice


def derive_policy(policy: dict, gbops: float | None = None, size_mb: float | None = None,
                  convention: str = "whole", params: dict[str, int] | None = None, fixed_size_bits: float = 0.0,
                  time_limit: float = 60.0, min_fraction: float | None = None) -> dict:
    """A new policy: the most probable bits of ``policy``'s searched layers within the budget(s).

    ``gbops``: BOPs budget per image in G (``convention`` ``whole``: every layer counts; ``quantized``: the searched
    layers only). ``size_mb``: model size budget in MB (1e6 bytes), with ``params`` (weights per searched layer) and
    ``fixed_size_bits`` (every other parameter at 32 bits). ``min_fraction``: also use at least this fraction of the
    BOPs budget (e.g. 0.99: compare methods at the same BOPs, not merely under it). Non-searched entries are copied
    unchanged.
    """
    if convention not in CONVENTIONS:
        raise UserError(f"BOPs convention {convention!r} is not accepted; accepted values: {list(CONVENTIONS)}")
    if gbops is None and size_mb is None:
        raise UserError("give a budget: --gbops G (BOPs per image, in 1e9) and/or --size-mb MB")
    layers = _searched(policy)
    names = list(layers)
    options = [_pairs(layers[n]) for n in names]
    costs = [np.array([o[2] for o in opts]) for opts in options]
    rows = []
    if gbops is not None:
        fixed = fixed_bops(policy) if convention == "whole" else 0.0
        coef = [np.array([layers[n]["macs"] * w * a for w, a, _ in opts], dtype=np.float64)
                for n, opts in zip(names, options)]
        lo = (fixed + sum(cf.min() for cf in coef)) / 1e9
        hi = (fixed + sum(cf.max() for cf in coef)) / 1e9
        rows.append(("BOPs", coef, gbops * 1e9 - fixed,
                     f"{gbops:g} GBOPs ({convention} model) is below the all-minimum-bits cost; the feasible range "
                     f"is {lo:.6g} .. {hi:.6g} GBOPs (every searched layer at its lowest .. highest bits)"))
    if size_mb is not None:
        if params is None:
            raise UserError("a size budget needs the parameter count of every searched layer")
        coef = [np.array([params[n] * w for w, _, _ in opts], dtype=np.float64) for n, opts in zip(names, options)]
        lo = (fixed_size_bits + sum(cf.min() for cf in coef)) / 8e6
        hi = (fixed_size_bits + sum(cf.max() for cf in coef)) / 8e6
        rows.append(("size", coef, size_mb * 8e6 - fixed_size_bits,
                     f"{size_mb:g} MB is below the all-minimum-bits size; the feasible range is {lo:.6g} .. "
                     f"{hi:.6g} MB"))
    lower = {}
    if min_fraction is not None:
        if gbops is None or not 0 < min_fraction <= 1:
            raise UserError(f"min_fraction={min_fraction!r} needs a BOPs budget and a value in (0, 1]")
        lower["BOPs"] = min_fraction * gbops * 1e9 - (fixed_bops(policy) if convention == "whole" else 0.0)
    choice = solve_policy_ilp(costs, rows, time_limit, lower)
    out = {n: dict(e) for n, e in policy["layers"].items()}
    log_prob = 0.0
    for n, opts, j in zip(names, options, choice):
        w, a, cost = opts[j]
        out[n].update(w_bits=w, a_bits=a)
        log_prob -= cost
    summary = {"log_prob": log_prob, "derived_from": policy.get("summary", {}), "budget_gbops": gbops,
               "budget_size_mb": size_mb, "bops_convention": convention, "min_fraction": min_fraction}
    cb = {k: v for k, v in policy.get("created_by", {}).items() if k not in ("method", "date", "selection")}
    return make_policy(policy["model"], out, policy["created_by"]["method"], summary,
                       selection="budget_ilp", **cb)

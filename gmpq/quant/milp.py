"""The exact "one option per layer" integer program shared by every bit allocator (DETR's Hessian ILP, the
search's budget-exact policy): ``min c x`` over binary ``x`` under linear constraints, solved with HiGHS
(``scipy.optimize.milp``) so that its absolute tolerances cannot hide differences between small costs.

HiGHS stops when the incumbent is within an ABSOLUTE gap of 1e-6 of its bound (``mip_abs_gap``, which scipy does
not expose) and judges reduced costs with absolute tolerances. Scaled by the largest cost, an objective made of
low-cost layers can be ~1e-4, so allocations up to 1e-2 worse passed as optimal. ``solve_exact`` therefore solves
once scaled by the largest cost, then again scaled so that the first solution's objective is ``OBJECTIVE_SCALE``:
the absolute gap is then 1e-10 of the objective, whatever the spread of the costs.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, milp

from gmpq.errors import UserError

OBJECTIVE_SCALE = 1e4  # the optimal objective, rescaled, that the second solve sees


def solve_binary(c: np.ndarray, cons: list, time_limit: float, infeasible: str):
    """One HiGHS solve of ``min c x``, ``x`` binary; a ``UserError`` ending with ``infeasible`` when none exists."""
    res = milp(c, integrality=np.ones_like(c), bounds=Bounds(0, 1), constraints=cons,
               options={"mip_rel_gap": 0.0, "time_limit": time_limit})
    if res.x is None:
        raise UserError(f"the bit allocation ILP has no solution (HiGHS status {res.status}: {res.message}); "
                        f"{infeasible}")
    return res


def solve_exact(excess: np.ndarray, cons: list, time_limit: float, infeasible: str):
    """-> (costs as solved, HiGHS result) for ``min excess x`` (``excess`` flat, >= 0, e.g. each layer's cost over
    its cheapest option), optimal to ~1e-10 of the objective (see the module docstring)."""
    top = float(excess.max()) if excess.size else 0.0
    c = (excess / (top if top > 0 else 1.0)).ravel()
    res = solve_binary(c, cons, time_limit, infeasible)
    obj = float(c @ np.round(res.x))
    if res.status == 0 and obj > 0:
        c = c * (OBJECTIVE_SCALE / obj)
        res2 = solve_binary(c, cons, time_limit, infeasible)
        if float(c @ np.round(res2.x)) <= OBJECTIVE_SCALE:  # never keep a worse answer
            res = res2
    return c, res

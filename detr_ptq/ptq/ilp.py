"""Bit allocation as an integer linear program (pure: numpy in, dict out), solved by HiGHS via scipy.

Variables ``x[l, j]`` in {0, 1}: layer ``l`` gets candidate bit-width ``bits[j]``.

    minimize    sum_{l,j} omega[l, j] x[l, j]
    subject to  sum_j x[l, j] = 1                                   for every layer (exactly one bit-width)
                sum_{l,j} params[l] bits[j] x[l, j] / sum params <= target_avg_bits
                fixed_size_bits + sum params[l] bits[j] x[l, j]    <= max_size_bits       (optional)
                fixed_bops + sum bops_per_bit[l] bits[j] x[l, j]   <= max_bops            (optional)

``bops_per_bit[l]`` is MACs x activation bits of the layer, so ``bops_per_bit * w_bits`` is its BOPs.

Exactness: Omega spans many decades (traces and quantization errors both do), while HiGHS's stopping gap and
reduced-cost tests are absolute. The solver therefore minimises the excess over each layer's cheapest choice
and solves twice, the second time with the costs scaled so that the first answer's objective is 1e4
(``gmpq.quant.milp.solve_exact``, shared with the search's budget-exact policy); tests compare it with brute
force and with an independent dynamic program over the integer budget on instances whose Omega spans 8 decades
(100 layers x bits {3, 4, 5, 6}).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from gmpq.errors import UserError
from gmpq.quant.milp import solve_exact

STATUS = {0: "optimal", 1: "iteration or time limit", 2: "infeasible", 3: "unbounded", 4: "other"}


def _budget_rows(params: np.ndarray, bits: np.ndarray, target: float, max_size_bits: float | None,
                 fixed_size_bits: float, bops_per_bit: np.ndarray | None, max_bops: float | None,
                 fixed_bops: float) -> list[tuple[str, np.ndarray, float, float]]:
    """-> [(name, coefficient row over x (L*B), upper bound, value at all-minimum bits)]."""
    rows = [("average bits", (params[:, None] * bits[None, :]).ravel() / params.sum(), target, float(bits.min()))]
    if max_size_bits is not None:
        row = (params[:, None] * bits[None, :]).ravel()
        rows.append(("model size (bits)", row, max_size_bits - fixed_size_bits,
                     float(params.sum() * bits.min())))
    if max_bops is not None:
        if bops_per_bit is None:
            raise UserError("a BOPs budget needs the MACs of every layer (bops_per_bit)")
        row = (bops_per_bit[:, None] * bits[None, :]).ravel()
        rows.append(("BOPs", row, max_bops - fixed_bops, float(bops_per_bit.sum() * bits.min())))
    return rows


def solve_bit_allocation(omega: np.ndarray, params: np.ndarray, bits: Sequence[int], target_avg_bits: float,
                         max_size_bits: float | None = None, fixed_size_bits: float = 0.0,
                         bops_per_bit: np.ndarray | None = None, max_bops: float | None = None,
                         fixed_bops: float = 0.0, time_limit: float = 60.0, fill_budget: bool = True) -> dict:
    """Solve the ILP above. ``omega`` [L, B] (finite, >= 0), ``params`` [L] > 0, ``bits`` [B].

    ``fill_budget``: when some layer's Omega is flat (trace 0: it ties at every bit-width), take, among the
    optimal allocations, one with (nearly) the most bits (a second ILP); without it such layers may sit at the
    lowest bits and leave the budget unused.

    Returns ``{"bits": [L] chosen bit-widths, "choice": [L] column indices, "status", "objective",
    "avg_bits", "seconds"}``. An infeasible budget raises ``UserError`` with the feasible range.
    """
    omega = np.asarray(omega, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    bits_arr = np.asarray(bits, dtype=np.float64)
    n_layers, n_bits = omega.shape
    if n_bits != len(bits_arr) or params.shape != (n_layers,):
        raise ValueError(f"omega {omega.shape}, params {params.shape} and bits {len(bits_arr)} do not agree")
    if not np.isfinite(omega).all() or (omega < 0).any():
        raise ValueError("omega must be finite and >= 0 (see allocate.clean_traces)")
    lo, hi = float(bits_arr.min()), float(bits_arr.max())
    if target_avg_bits < lo:
        raise UserError(f"target average bits {target_avg_bits} is infeasible with candidate bits "
                        f"{[int(b) for b in bits]}: feasible targets are {lo:g} to {hi:g} (every layer at "
                        f"{lo:g} bits reaches {lo:g}); lower the candidate bits or raise the target")
    rows = _budget_rows(params, bits_arr, target_avg_bits, max_size_bits, fixed_size_bits, bops_per_bit,
                        max_bops, fixed_bops)
    violated = [(name, ub, at_min) for name, _, ub, at_min in rows if at_min > ub * (1 + 1e-12)]
    if violated:
        text = "; ".join(f"{name}: the all-{lo:g}-bit model needs {at_min:.6g}, the budget allows {ub:.6g}"
                         for name, ub, at_min in violated)
        raise UserError(f"the bit allocation budget is infeasible ({text}); feasible average-bit targets are "
                        f"{lo:g} to {hi:g}, and size/BOPs budgets must admit the all-{lo:g}-bit model")

    t0 = time.perf_counter()
    excess = omega - omega.min(1, keepdims=True)  # a per-layer constant does not change which bits are best
    one_hot = np.kron(np.eye(n_layers), np.ones((1, n_bits)))
    for slack in (0.0, 1e-6):  # HiGHS accepts rows violated within its feasibility tolerance: retry tighter
        cons = [LinearConstraint(one_hot, 1, 1)]
        cons += [LinearConstraint(row[None, :], -np.inf, ub - slack * abs(ub)) for _, row, ub, _ in rows]
        c, res = solve_exact(excess, cons, time_limit, f"feasible average-bit targets are {lo:g} to {hi:g}")
        flat = (excess.max(1) <= 1e-12 * max(excess.max(), 1e-300)).any()
        if fill_budget and flat and res.status == 0:
            res = _fill_budget(c, res, cons, params, bits_arr)
        choice = res.x.reshape(n_layers, n_bits).argmax(1)
        x = np.zeros_like(c)
        x[np.arange(n_layers) * n_bits + choice] = 1
        if all(row @ x <= ub + 1e-9 * max(abs(ub), 1) for _, row, ub, _ in rows):
            break
    seconds = time.perf_counter() - t0
    chosen_bits = bits_arr[choice]
    avg = float((params * chosen_bits).sum() / params.sum())
    return {"bits": [int(b) for b in chosen_bits], "choice": [int(j) for j in choice],
            "status": STATUS.get(res.status, str(res.status)), "message": str(res.message),
            "objective": float(omega[np.arange(n_layers), choice].sum()), "avg_bits": avg, "seconds": seconds}


def _fill_budget(c: np.ndarray, res, cons: list, params: np.ndarray, bits: np.ndarray):
    """Second stage: maximize the parameter-weighted bits subject to the first stage's objective (+ 1e-9).

    This is a subset-sum-like problem that HiGHS can take minutes to PROVE optimal, so it stops at a 1e-4
    relative gap (1e-4 x the average bits) or after 2 s, keeping the best allocation found; the first stage's
    objective is guaranteed either way."""
    bonus = -(params[:, None] * bits[None, :]).ravel() / params.sum()
    obj = float(c @ np.round(res.x))
    if obj > 0:  # c is scaled so that obj = OBJECTIVE_SCALE: 1e-9 of it is far above HiGHS's tolerances
        cap = LinearConstraint(c[None, :], -np.inf, obj * (1 + 1e-9))
    else:  # optimum 0: only zero-cost choices; scaled so the smallest positive cost (1) cannot hide in tolerances
        positive = c[c > 0]
        cap = LinearConstraint((c / positive.min() if positive.size else c)[None, :], -np.inf, 1e-3)
    res2 = milp(bonus, integrality=np.ones_like(c), bounds=Bounds(0, 1), constraints=[*cons, cap],
                options={"mip_rel_gap": 1e-4, "time_limit": 2.0})
    return res2 if res2.x is not None and float(bonus @ res2.x) <= float(bonus @ res.x) else res


def brute_force(omega: np.ndarray, params: np.ndarray, bits: Sequence[int], target_avg_bits: float
                ) -> tuple[float, list[int]] | None:
    """Exhaustive reference for small problems: (best objective, chosen bits), or None when infeasible."""
    import itertools

    best = None
    bits_arr = np.asarray(bits, dtype=np.float64)
    for choice in itertools.product(range(len(bits)), repeat=len(params)):
        idx = np.asarray(choice)
        if (params * bits_arr[idx]).sum() / params.sum() > target_avg_bits + 1e-12:
            continue
        obj = float(omega[np.arange(len(params)), idx].sum())
        if best is None or obj < best[0]:
            best = (obj, [int(bits_arr[j]) for j in idx])
    return best

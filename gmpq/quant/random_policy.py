"""A random mixed-precision policy at a BOPs budget: the baseline every searched policy must beat."""

from __future__ import annotations

import random
from collections.abc import Sequence

from torch import nn

from gmpq.errors import UserError
from gmpq.quant import functional as F
from gmpq.quant.cost import measure_macs
from gmpq.quant.policy import make_policy


def _bops(macs: dict[str, int], bits: dict[str, list[int]], fixed: int) -> int:
    return fixed + sum(macs[n] * w * a for n, (w, a) in bits.items())


def random_policy(model: nn.Module, model_name: str, target_bops: float, input_size: Sequence[int],
                  seed: int = 0, candidates: Sequence[int] = (2, 3, 4, 5, 6, 7, 8),
                  keep_full_precision: Sequence[str] = (), tolerance: float = 0.01) -> dict:
    """Draw bits uniformly from ``candidates`` for every layer's weights and activations, then walk single-bit
    steps (random layer and side, never overshooting when a smaller step exists) until total BOPs is within
    ``tolerance`` of ``target_bops`` (BOPs per image; full-precision layers count at 32x32).

    Raises ``UserError`` when the target is outside what the candidates can reach.
    """
    for b in candidates:
        F.check_bits(b, "candidate bits")
    cands = sorted(set(candidates))
    macs = measure_macs(model, input_size)
    free = [n for n in macs if n not in keep_full_precision]
    fixed = sum(macs[n] * 32 * 32 for n in keep_full_precision if n in macs)
    lo = fixed + sum(macs[n] for n in free) * cands[0] ** 2
    hi = fixed + sum(macs[n] for n in free) * cands[-1] ** 2
    if not lo <= target_bops <= hi:
        raise UserError(f"--bops {target_bops / 1e9:.4f} G is unreachable with bits {cands}: feasible range is "
                        f"{lo / 1e9:.4f} .. {hi / 1e9:.4f} G")
    rng = random.Random(seed)
    bits = {n: [rng.choice(cands), rng.choice(cands)] for n in free}
    for _ in range(100 * len(free) + 100):
        gap = target_bops - _bops(macs, bits, fixed)
        if abs(gap) <= tolerance * target_bops:
            break
        step = 1 if gap > 0 else -1
        moves = []
        for n, pair in bits.items():
            for side in (0, 1):
                i = cands.index(pair[side]) + step
                if 0 <= i < len(cands):
                    delta = macs[n] * (cands[i] - pair[side]) * pair[1 - side]
                    moves.append((n, side, cands[i], delta))
        if not moves:
            break
        rng.shuffle(moves)
        fitting = [m for m in moves if abs(m[3]) <= abs(gap)]
        n, side, value, _ = fitting[0] if fitting else min(moves, key=lambda m: abs(m[3]))
        bits[n][side] = value
        if not fitting:
            break
    layers = {n: {"w_bits": w, "a_bits": a, "macs": macs[n]} for n, (w, a) in bits.items()}
    layers.update({n: {"w_bits": F.FULL_PRECISION, "a_bits": None, "macs": macs[n]}
                   for n in keep_full_precision if n in macs})
    achieved = _bops(macs, bits, fixed)
    return make_policy(model_name, layers, "random", seed=seed, candidates=cands, target_bops=target_bops,
                       summary={"bops": achieved, "target_bops": target_bops})

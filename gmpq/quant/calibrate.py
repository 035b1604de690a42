"""Calibration of activation quantizers: observe a few batches in full precision, then set the ranges."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.quant.quantizers import ActQuantizer


def _inputs(batch):
    """A loader may yield ``x`` or ``(x, y, ...)``; the model gets ``x``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int = 8, device: torch.device | str | None = None
              ) -> dict[str, dict]:
    """Run up to ``num_batches`` batches through ``model`` with every activation quantizer observing, then
    initialise them. Weights are not changed; BN statistics are not updated (eval mode).

    Returns ``{quantizer_name: {"signed", "alpha"|"step","offset"}}`` for logging.
    """
    acts = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer) and m.bits < 32}
    if not acts:
        return {}
    was_training = model.training
    model.eval()
    for q in acts.values():
        q.observing = True
        q._stats.clear()
    seen = 0
    try:
        for batch in batches:
            x = _inputs(batch)
            model(x.to(device) if device is not None else x)
            seen += 1
            if seen >= num_batches:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        for q in acts.values():
            q.observing = False
        raise UserError("calibration got no batches: the calibration data loader is empty")
    out = {}
    for name, q in acts.items():
        q.finish_calibration()
        state = {"signed": bool(q.signed)}
        state.update({k: float(v) for k, v in q.named_parameters()})
        out[name] = state
    return out


def is_calibrated(model: nn.Module) -> bool:
    return all(bool(m.initialized) for m in model.modules() if isinstance(m, ActQuantizer) and m.bits < 32)


def require_calibrated(model: nn.Module) -> None:
    missing = [n for n, m in model.named_modules()
               if isinstance(m, ActQuantizer) and m.bits < 32 and not bool(m.initialized)]
    if missing:
        raise UserError(f"{len(missing)} activation quantizer(s) are not calibrated (e.g. {missing[:3]}); run "
                        "gmpq.quant.calibrate(model, batches) first")

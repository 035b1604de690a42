"""Calibration of activation quantizers: observe a few batches in full precision, then set the ranges.

Besides ``ActQuantizer`` any module with a class attribute ``calibration_observer = True``, an ``observing`` flag,
an ``initialized`` buffer read through ``gmpq.quant.host_flags.HostFlags`` and ``finish_calibration()`` takes part
(e.g. DETR's query distribution alignment).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.quant.quantizers import ActQuantizer


def _inputs(batch):
    """A loader may yield ``x`` or ``(x, y, ...)``; the model gets ``x``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _observers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if (isinstance(m, ActQuantizer) and m.bits < 32) or getattr(m, "calibration_observer", False)}


def _rng_devices(model: nn.Module) -> list[int]:
    devs = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    return sorted({d.index or 0 for d in devs if d.type == "cuda"})


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int = 8, device: torch.device | str | None = None,
              forward: Callable[[nn.Module, Any], Any] | None = None, only: Collection[str] | None = None,
              seed: int | None = None, progress: bool = False) -> dict[str, dict]:
    """Run up to ``num_batches`` batches through ``model`` with every activation quantizer observing, then
    initialise them. Weights are not changed; BN statistics are not updated (eval mode).

    ``forward(model, batch)`` runs one batch (default: ``model(x)`` with ``x`` the batch or its first item, moved
    to ``device``), for models whose forward takes more than one input. ``only``: the names of the quantizers
    to (re)calibrate; the others keep their state and quantize as usual.
    ``seed``: the observers subsample large tensors at random. None: they draw from the global random state.
    An int: the whole calibration (observers and a loader without its own generator) runs under a forked random
    state seeded with ``seed``, so the same model and data always give the same ranges and the caller's random
    state is left untouched (``gmpq evaluate`` and ``gmpq export`` use 0, so they calibrate identically).
    ``progress``: report the batches done (``gmpq.runtime.progress``: a bar on a terminal, plain lines in a log).
    Returns ``{quantizer_name: {"signed", "alpha"|"step","offset"}}`` for logging.
    """
    if seed is None:
        return _calibrate(model, batches, num_batches, device, forward, only, progress)
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        return _calibrate(model, batches, num_batches, device, forward, only, progress)


def _calibrate(model, batches, num_batches, device, forward, only, progress=False) -> dict[str, dict]:
    from gmpq.runtime.progress import Progress

    acts = {n: m for n, m in _observers(model).items() if only is None or n in only}
    if not acts:
        return {}
    was_training = model.training
    model.eval()
    for q in acts.values():
        q.observing = True
        q._stats.clear()
        if hasattr(q, "_samples"):
            q._samples.clear()
    seen = 0
    bar = Progress(num_batches, "calibration", progress, unit="batch")
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                x = _inputs(batch)
                model(x.to(device) if device is not None else x)
            seen += 1
            bar.update(1)
            if seen >= num_batches:
                break
    finally:
        bar.close()
        model.train(was_training)
    if seen == 0:
        for q in acts.values():
            q.observing = False
        raise UserError("calibration got no batches: the calibration data loader is empty")
    out = {}
    for name, q in acts.items():
        q.finish_calibration()
        state = {"signed": q.flag("signed")} if hasattr(q, "signed") else {}
        state.update({k: v.tolist() for k, v in q.named_parameters()})
        out[name] = state
    return out


def is_calibrated(model: nn.Module) -> bool:
    return all(m.flag("initialized") for m in _observers(model).values())


def require_calibrated(model: nn.Module) -> None:
    missing = [n for n, m in _observers(model).items() if not m.flag("initialized")]
    if missing:
        raise UserError(f"{len(missing)} activation quantizer(s) are not calibrated (e.g. {missing[:3]}); run "
                        "gmpq.quant.calibrate(model, batches) first")

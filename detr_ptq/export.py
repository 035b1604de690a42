"""Packed export of a weight-only PTQ DETR (``detr-ptq allocate`` policy) and its reload.

The packed file (``gmpq.quant.export``) stores each quantized weight at its bit-width; the DETR architecture comes
from the float checkpoint, whose other tensors the packed file also carries. ``load_packed_detr`` rebuilds the
fake-quant model exactly (same codes, same per-tensor scales), so it scores the same AP.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from detr_ptq.ptq.apply import load_float, quantize_detr
from gmpq.paths import expand_path
from gmpq.quant.export import export_packed, load_packed, theoretical_packed_bytes
from gmpq.quant.policy import load_policy


def export_detr(checkpoint: str | os.PathLike, policy_path: str | os.PathLike, out: str | os.PathLike,
                config: str = "") -> dict:
    """Weight-only PTQ of the checkpoint with the policy, written to ``out``; returns the size statistics."""
    model, _, _, dcfg = load_float(checkpoint, config)
    policy = load_policy(expand_path(policy_path))
    quantize_detr(model, policy, dcfg.name, f"policy file {str(policy_path)!r}")
    stats = export_packed(model, policy, Path(out), meta={"checkpoint": str(checkpoint), "detr": dcfg.name})
    return {**stats, "theoretical_bytes": theoretical_packed_bytes(model)}


def load_packed_detr(path: str | os.PathLike, checkpoint: str | os.PathLike, config: str = ""
                     ) -> tuple[nn.Module, dict]:
    """-> (the fake-quant DETR rebuilt from the packed file, postprocessors); ``checkpoint`` gives the
    architecture (its weights are replaced by the packed ones)."""
    model, _, post, _ = load_float(checkpoint, config)
    return load_packed(path, model).eval(), post

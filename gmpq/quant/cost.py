"""Cost accounting: MACs per layer, BOPs, model size, average weight bits and compression.

Definitions (per image, for a given input size):
- MACs of a conv: ``H_out * W_out * C_out * (C_in / groups) * k_h * k_w``; of a linear: ``(numel(out) /
  out_features) * out_features * in_features``. Registered layer types may define ``macs(inputs, output)``.
- BOPs = MACs x w_bits x a_bits, with 32 for a full-precision side. Two conventions, both reported:
  ``bops`` counts the WHOLE model (full-precision layers such as the first conv and the classifier at 32 x 32);
  ``quantized_bops`` counts only the quantized layers (``w_bits < 32``), which is the convention of the GMPQ and
  EdMIPS papers' tables (their first and last layers stay in full precision and are left out).
- Size: quantized layers' weights at ``w_bits``; every other parameter (biases, norms, full-precision layers) at 32
  bits. Buffers (BN running statistics) are not counted: they fold into the weights at deployment.
- Average weight bits: over the weights of all quantizable layers, weighted by parameter count.
- Compression: 32-bit size / size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gmpq.quant import functional as F
from gmpq.quant.modules import quantizable_layers, quantizers_disabled


def _layer_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if hasattr(module, "macs"):
        return int(module.macs(inputs, output))
    out = output[0] if isinstance(output, (tuple, list)) else output
    per_image = out.numel() // out.shape[0]
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    raise TypeError(f"no MAC rule for {type(module).__name__}; define a macs(inputs, output) method")


@torch.no_grad()
def measure_macs(model: nn.Module, input_size: Sequence[int], example: torch.Tensor | None = None) -> dict[str, int]:
    """MACs per image of every quantizable layer, measured with one forward pass at ``input_size`` (C, H, W).

    Batch-norm statistics and quantizer state are left untouched (eval mode, quantizers bypassed).
    """
    layers = quantizable_layers(model)
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, output) -> None:
            macs[name] = macs.get(name, 0) + _layer_macs(mod, inputs, output)  # a layer may run several times
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = example if example is not None else torch.zeros(1, *input_size, device=device)
    try:
        model.eval()
        with quantizers_disabled(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: macs.get(n, 0) for n in layers}


def _bits(b: int | None) -> int:
    return F.FULL_PRECISION if b is None else b


def cost_summary(model: nn.Module, layer_bits: dict[str, tuple[int, int | None]], input_size: Sequence[int],
                 macs: dict[str, int] | None = None) -> dict:
    """Totals and per-layer rows for ``model`` at ``layer_bits`` (``{name: (w_bits, a_bits)}``; missing = 32/32).

    Returns ``{"macs", "bops", "float_bops", "quantized_bops", "quantized_float_bops", "size_bytes",
    "float_size_bytes", "avg_w_bits", "avg_a_bits", "compression", "params",
    "layers": [{"name", "type", "params", "macs", "w_bits", "a_bits", "bops"}]}``.
    BOPs are per image; sizes in bytes.
    """
    macs = macs if macs is not None else measure_macs(model, input_size)
    qlayers = quantizable_layers(model)
    rows, weight_ids = [], set()
    size_bits = 0
    for name, layer in qlayers.items():
        w_bits, a_bits = layer_bits.get(name, (F.FULL_PRECISION, None))
        weights = list(layer.quantized_weights()) if hasattr(layer, "quantized_weights") else [layer.weight]
        n_w = sum(p.numel() for p in weights)
        weight_ids.update(id(p) for p in weights)
        size_bits += n_w * w_bits
        m = macs.get(name, 0)
        rows.append({"name": name, "type": type(layer).__name__, "params": n_w, "macs": m,
                     "w_bits": w_bits, "a_bits": a_bits, "bops": m * w_bits * _bits(a_bits)})
    total_params = sum(p.numel() for p in model.parameters())
    other = sum(p.numel() for p in model.parameters() if id(p) not in weight_ids)
    size_bits += other * F.FULL_PRECISION
    qparams = sum(r["params"] for r in rows) or 1
    total_macs = sum(r["macs"] for r in rows) or 1
    quantized = [r for r in rows if r["w_bits"] < F.FULL_PRECISION]
    return {
        "macs": sum(r["macs"] for r in rows),
        "bops": sum(r["bops"] for r in rows),
        "float_bops": sum(r["macs"] for r in rows) * F.FULL_PRECISION**2,
        "quantized_bops": sum(r["bops"] for r in quantized),
        "quantized_float_bops": sum(r["macs"] for r in quantized) * F.FULL_PRECISION**2,
        "size_bytes": size_bits / 8,
        "float_size_bytes": total_params * 4,
        "avg_w_bits": sum(r["params"] * r["w_bits"] for r in rows) / qparams,
        "avg_a_bits": sum(r["macs"] * _bits(r["a_bits"]) for r in rows) / total_macs,
        "compression": total_params * F.FULL_PRECISION / max(size_bits, 1),
        "params": total_params,
        "layers": rows,
    }


def format_summary(summary: dict, title: str = "") -> str:
    """A markdown table of per-layer rows and totals (BOPs in G, size in MB = 1e6 bytes)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| layer | type | params | MACs | w_bits | a_bits | GBOPs |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary["layers"]:
        a = "fp" if r["a_bits"] in (None, 32) else r["a_bits"]
        w = "fp" if r["w_bits"] == 32 else r["w_bits"]
        lines.append(f"| {r['name']} | {r['type']} | {r['params']} | {r['macs']} | {w} | {a} | {r['bops'] / 1e9:.4f} |")
    lines += [
        "",
        f"- MACs: {summary['macs'] / 1e6:.3f} M per image",
        f"- BOPs, whole model: {summary['bops'] / 1e9:.4f} G (float: {summary['float_bops'] / 1e9:.3f} G)",
        f"- BOPs, quantized layers only (the papers' convention): {summary['quantized_bops'] / 1e9:.4f} G "
        f"(same layers in float: {summary['quantized_float_bops'] / 1e9:.3f} G)",
        f"- size: {summary['size_bytes'] / 1e6:.4f} MB (float: {summary['float_size_bytes'] / 1e6:.4f} MB), "
        f"compression {summary['compression']:.2f}x",
        f"- average bits: weights {summary['avg_w_bits']:.3f} (by parameters), "
        f"activations {summary['avg_a_bits']:.3f} (by MACs)",
    ]
    return "\n".join(lines)

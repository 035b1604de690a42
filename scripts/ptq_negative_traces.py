"""Negative output-quant traces of the reference detector: L1 vs Smooth-L1 box term, all-layers vs per-layer
probes (docs/ptq.md, "Negative output-quant traces, before and after").

    detr-ptq make-digits-coco --out runs/ptq_digits --seed 0
    .venv/bin/python scripts/ptq_negative_traces.py runs/ptq_digits [variant ...]   # ~15 CPU-minutes for all four
"""

from __future__ import annotations

import json
import sys
import time

import torch

from detr_ptq.ptq.apply import load_float
from detr_ptq.ptq.calibset import CalibConfig, calibration_loader, checkpoint_resize, load_batches
from detr_ptq.ptq.distill import DistillConfig
from detr_ptq.ptq.hutchinson import HutchinsonConfig
from detr_ptq.ptq.sensitivity import DEFAULT_EXCLUDE, SensitivityConfig, is_excluded, layer_traces

CHECKPOINT = "detr_ptq/assets/detr_tiny_digits.pth"
PER_LAYER = HutchinsonConfig(max_probes=48, mode="per-layer", probes_per_batch=4)
ALL_LAYERS = HutchinsonConfig(max_probes=100, mode="all")
VARIANTS = {
    "before: L1, all-layers probe": (DistillConfig(box_loss="l1"), ALL_LAYERS),
    "smooth-L1, all-layers probe": (DistillConfig(), ALL_LAYERS),
    "after: smooth-L1, per-layer probes": (DistillConfig(), PER_LAYER),
    "L1, per-layer probes": (DistillConfig(box_loss="l1"), PER_LAYER),
}


def count(result: dict) -> dict:
    layers = result["layers"]
    alloc = [n for n in layers if not is_excluded(n, DEFAULT_EXCLUDE)]
    rel = sorted(layers[n]["rel_stderr"] or float("inf") for n in alloc)
    return {"negative_allocated": sum(layers[n]["trace"] < 0 for n in alloc), "allocated": len(alloc),
            "negative_beyond_3se_all": sum(layers[n]["trace"] < -3 * (layers[n]["stderr"] or 0) for n in layers),
            "all": len(layers), "median_rel_stderr": rel[len(rel) // 2], "seconds": result["seconds"],
            "probes": result["probes"], "box_residual_max": result.get("box_residual_max"),
            "share_outside_beta": result.get("box_residual_share_outside_beta")}


def main() -> None:
    torch.set_num_threads(1)
    model, criterion, _, _ = load_float(CHECKPOINT)
    min_size, max_size = checkpoint_resize(CHECKPOINT)
    loader, _ = calibration_loader(CalibConfig(data_dir=sys.argv[1], num_images=100), min_size, max_size)
    batches = load_batches(loader)
    out = {}
    for name in sys.argv[2:] or list(VARIANTS):
        distill, hutchinson = VARIANTS[name]
        cfg = SensitivityConfig(checkpoint=CHECKPOINT, distill=distill, hutchinson=hutchinson)
        result = layer_traces(model, criterion, batches, "output-quant", cfg, check=False)
        out[name] = {**count(result), "traces": {n: [r["trace"], r["stderr"]] for n, r in result["layers"].items()}}
        print(name, {k: v for k, v in out[name].items() if k != "traces"}, flush=True)
    path = f"runs/ptq_negative_traces_{int(time.time())}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

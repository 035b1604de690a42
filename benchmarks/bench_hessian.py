"""Benchmark: Hutchinson with one probe for all layers vs one layer at a time (PyHessian), and the ILP solve time.

    .venv/bin/python benchmarks/bench_hessian.py --out runs/bench_hessian.json
    .venv/bin/python benchmarks/bench_hessian.py --archs detr_r50 --image-size 800 --device cuda

For each architecture (random weights: timing does not depend on them) and the DETR training loss on synthetic
targets, it measures the seconds of one Hessian-vector product over ALL quantizable layers, and the seconds of
per-layer products on ``--per-layer-sample`` layers (each needs its own forward and double backward; the cost of
one full per-layer probe = mean x number of layers, reported as an extrapolation). Then it times the ILP on a
114-layer x 4-bit problem (the DETR-R50 allocation size: 118 quantizable layers minus the 4 head layers) with
the real R50 parameter counts and log-uniform random Omega.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import numpy as np
import torch

import detr_ptq.models.qattention  # noqa: F401
from detr_ptq.models import build_detr, get_preset
from detr_ptq.models.criterion import weighted_total
from detr_ptq.ptq.hutchinson import probe_all_layers, probe_one_layer, rademacher_like, traced_weights
from detr_ptq.ptq.ilp import solve_bit_allocation
from detr_ptq.ptq.sensitivity import DEFAULT_EXCLUDE, is_excluded
from gmpq.io import atomic_write_json
from gmpq.quant.modules import quantizable_layers


def _targets(batch: int, gen: torch.Generator) -> list[dict]:
    out = []
    for _ in range(batch):
        n = 3
        centers = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=gen) * 0.2 + 0.1
        out.append({"labels": torch.randint(1, 10, (n,), generator=gen), "boxes": torch.cat([centers, sizes], 1)})
    return out


def bench_arch(name: str, image_size: int, batch: int, repeats: int, per_layer_sample: int, device: str) -> dict:
    cfg = get_preset(name)
    torch.manual_seed(0)
    model, criterion, _ = build_detr(cfg)
    model.to(device).eval()
    criterion.to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
    mask = torch.zeros(batch, image_size, image_size, dtype=torch.bool, device=device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in _targets(batch, gen)]
    layers = traced_weights(model, quantizable_layers(model))

    def loss_fn() -> torch.Tensor:
        return weighted_total(criterion(model(images, mask), targets), criterion.weight_dict)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    vec = {n: rademacher_like(ps, gen) for n, ps in layers.items()}
    probe_all_layers(loss_fn(), layers, vec)  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        probe_all_layers(loss_fn(), layers, vec)
    sync()
    all_s = (time.perf_counter() - t0) / repeats

    names = list(layers)
    sample = names[:: max(1, len(names) // per_layer_sample)][:per_layer_sample]
    t0 = time.perf_counter()
    for n in sample:
        probe_one_layer(loss_fn, layers[n], vec[n])
    sync()
    one_s = (time.perf_counter() - t0) / len(sample)
    return {
        "arch": name, "image_size": image_size, "batch": batch, "device": device, "layers": len(names),
        "params_traced": sum(p.numel() for ps in layers.values() for p in ps),
        "all_layers": {"hvps_per_probe": 1, "seconds_per_probe": all_s, "seconds_per_image": all_s / batch},
        "per_layer": {"hvps_per_probe": len(names), "seconds_per_hvp": one_s, "layers_timed": len(sample),
                      "seconds_per_probe_extrapolated": one_s * len(names),
                      "seconds_per_image_extrapolated": one_s * len(names) / batch},
        "speedup": one_s * len(names) / all_s,
    }


def bench_ilp(repeats: int) -> dict:
    model, _, _ = build_detr(dataclasses.replace(get_preset("detr_r50")))
    layers = {n: m for n, m in quantizable_layers(model).items() if not is_excluded(n, DEFAULT_EXCLUDE)}
    params = np.asarray([sum(w.numel() for w in (m.quantized_weights() if hasattr(m, "quantized_weights")
                                                  else [m.weight])) for m in layers.values()], dtype=float)
    rng = np.random.default_rng(0)
    bits = [3, 4, 5, 6]
    rows = []
    for target in (4.0, 5.0):
        for r in range(repeats):
            sens = 10 ** rng.uniform(-6, 0, len(params))  # average traces spanning six decades
            err = params[:, None] * 4.0 ** -(np.asarray(bits)[None, :] - 3)  # ||Q_b(W)-W||^2 ~ n 4^-b
            sol = solve_bit_allocation(sens[:, None] * err, params, bits, target)
            rows.append({"target": target, "seed": r, "seconds": sol["seconds"], "status": sol["status"],
                         "avg_bits": sol["avg_bits"]})
    secs = [r["seconds"] for r in rows]
    return {"layers": len(params), "bits": bits, "solves": rows, "max_seconds": max(secs),
            "median_seconds": float(np.median(secs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["detr_tiny", "detr_r50"])
    p.add_argument("--image-size", type=int, nargs="+", default=[96, 320], help="one per arch (square, pixels)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--per-layer-sample", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ilp-repeats", type=int, default=5)
    p.add_argument("--out", default="runs/bench_hessian.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.image_size + [args.image_size[-1]] * (len(args.archs) - len(args.image_size))
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "archs": []}
    for arch, size in zip(args.archs, sizes):
        r = bench_arch(arch, size, args.batch, args.repeats, args.per_layer_sample, args.device)
        result["archs"].append(r)
        print(f"{arch} @ {size}px, batch {args.batch}, {r['layers']} layers: all layers "
              f"{r['all_layers']['seconds_per_probe']:.2f} s per probe "
              f"(1 HVP, {r['all_layers']['seconds_per_image']:.2f} s/image); per layer "
              f"{r['per_layer']['seconds_per_hvp']:.2f} s per HVP x {r['layers']} = "
              f"{r['per_layer']['seconds_per_probe_extrapolated']:.1f} s per probe "
              f"({r['per_layer']['seconds_per_image_extrapolated']:.2f} s/image); speed-up {r['speedup']:.0f}x",
              flush=True)
    result["ilp"] = bench_ilp(args.ilp_repeats)
    print(f"ILP {result['ilp']['layers']} layers x {len(result['ilp']['bits'])} bits: median "
          f"{result['ilp']['median_seconds'] * 1e3:.1f} ms, max {result['ilp']['max_seconds'] * 1e3:.1f} ms")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

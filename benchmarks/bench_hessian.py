"""Benchmark: per-layer Hessian traces at EQUAL standard error, ours vs a per-layer PyHessian-style loop.

    .venv/bin/python benchmarks/bench_hessian.py --quick           # < 1 minute (make bench)
    .venv/bin/python benchmarks/bench_hessian.py --rounds 6 --out runs/bench_hessian.json

Models: the reference detector (``detr_ptq/assets/detr_tiny_digits.pth``, its ``output-quant`` sensitivity loss on
real digits images) and ResNet-20 (``$GMPQ_DATA/cifar_resnets``, cross-entropy on real CIFAR-10 images). One
micro-batch each, the same for every method. Estimators of ``Tr(H_ll)`` for every layer ``l``:

- ``loop``: the per-layer PyHessian-style loop: for each layer, a forward, a first backward with ``create_graph``
  and one Hessian-vector product with a Rademacher probe on that layer alone (the reference);
- ``loop-reuse``: the same probes, the gradient graph built once per batch and reused by every layer (PyHessian
  reuses ``gradsH`` this way);
- ``per-layer``: ``detr_ptq.ptq.hutchinson.probe_per_layer``: graph reuse plus the ``--probes-per-batch`` probes
  of a layer batched in one double backward (``is_grads_batched``);
- ``ours``: ``detr_ptq.ptq.hutchinson.hutchpp_per_layer`` (the default ``hutch++`` mode): graph reuse, and per
  layer Hutch++ with k = ``--probes-per-batch`` (3k products in three batched double backwards);
- ``all-layers``: one probe over all layers, one product per probe (the previous estimator), whose per-layer
  samples carry the cross-layer terms.

The three Hutchinson per-layer methods draw the same kind of sample (``v_l^T H_ll v_l``), so their per-probe
variances are equal and are pooled; ``all-layers`` and ``ours`` have their own, measured per layer (ours: the
variance of whole estimates over rounds). Time to reach a standard error s on layer l is ``seconds per sample x
variance of a sample / s^2``, so the equal-SE speed-up of ours over a method X on layer l is
``(t_X var_X,l) / (t_ours var_ours,l)``: printed as the median and the minimum over layers. Variances from few
rounds are themselves rough (``--quick``: 3 Hutch++ estimates); the default settings use more. Methods run in
interleaved rounds; times are medians over rounds. Timings are CPU seconds on one thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from detr_ptq.ptq.hutchinson import (
    hutchpp_per_layer,
    probe_all_layers,
    probe_one_layer,
    probe_per_layer,
    rademacher_like,
    traced_weights,
)
from gmpq.io import atomic_write_json
from gmpq.quant.modules import quantizable_layers

ROOT = Path(__file__).resolve().parent.parent
HUTCHINSON_PER_LAYER = ("loop", "loop-reuse", "per-layer")


def detr_case(images: int) -> tuple[Callable[[], torch.Tensor], dict]:
    """The reference detector's output-quant loss (Smooth-L1 box term) on ``images`` digits training images."""
    from detr_ptq.data.digits_coco import make_digits_coco
    from detr_ptq.ptq.apply import load_float
    from detr_ptq.ptq.calibset import CalibConfig, calibration_loader, load_batches
    from detr_ptq.ptq.sensitivity import SensitivityConfig, metric_loss

    model, criterion, _, _ = load_float(ROOT / "detr_ptq/assets/detr_tiny_digits.pth")
    with tempfile.TemporaryDirectory() as d:
        make_digits_coco(d, seed=0, num_train=images, num_val=0)
        loader, _ = calibration_loader(CalibConfig(data_dir=d, num_images=images, batch_size=images), 96, 96)
        batch = load_batches(loader)[0]
    student, loss_fn = metric_loss("output-quant", model, criterion, SensitivityConfig())
    return (lambda: loss_fn(batch)), traced_weights(student, quantizable_layers(student))


def resnet20_case(images: int) -> tuple[Callable[[], torch.Tensor], dict]:
    """Pretrained ResNet-20, cross-entropy on the first ``images`` CIFAR-10 training images (ImageNet mean/std)."""
    from gmpq.models import create_model

    data = Path(os.environ.get("GMPQ_DATA", ROOT.parent / "shared" / "data"))
    model = create_model("resnet20", weights=str(data / "cifar_resnets/resnet20-12fca82f.th")).eval()
    raw = np.load(data / "cifar10/cifar10_original_subset.npz")
    x = torch.tensor(raw["x_train"][:images]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    y = torch.tensor(raw["y_train"][:images]).long()
    return (lambda: torch.nn.functional.cross_entropy(model(x), y)), traced_weights(model, quantizable_layers(model))


def one_round(method: str, loss_fn, layers: dict, gen: torch.Generator, k: int) -> tuple[float, dict, int]:
    """-> (seconds, {layer: [samples]}, samples per layer) for one round of ``method``. A Hutchinson sample is one
    probe's ``v^T H v``; a Hutch++ sample is one whole estimate (3k products per layer)."""
    t0 = time.perf_counter()
    if method == "loop":
        out = {n: [probe_one_layer(loss_fn, ps, rademacher_like(ps, gen))] for n, ps in layers.items()}
    elif method == "all-layers":
        vec = {n: rademacher_like(ps, gen) for n, ps in layers.items()}
        out = {n: [x] for n, x in probe_all_layers(loss_fn(), layers, vec).items()}
    elif method == "ours":
        out = {n: [x] for n, x in hutchpp_per_layer(loss_fn(), layers, gen, k).items()}
    else:
        probes = 1 if method == "loop-reuse" else k
        out = {n: s.tolist() for n, s in probe_per_layer(loss_fn(), layers, gen, probes).items()}
    seconds = time.perf_counter() - t0
    return seconds, out, len(next(iter(out.values())))


def bench_case(name: str, loss_fn, layers: dict, rounds: dict[str, int], k: int) -> dict:
    """Interleaved rounds of every method; per layer, the equal-SE cost ``seconds per sample x variance of a
    sample`` and its ratio to ours."""
    gen = torch.Generator().manual_seed(0)
    samples = {m: {n: [] for n in layers} for m in rounds}
    secs: dict[str, list[float]] = {m: [] for m in rounds}
    one_round("ours", loss_fn, layers, gen, k)  # warm-up
    for r in range(max(rounds.values())):
        for m in rounds:
            if r < rounds[m]:
                s, out, per_round = one_round(m, loss_fn, layers, gen, k)
                secs[m].append(s / per_round)
                for n, xs in out.items():
                    samples[m][n] += xs
    pooled = {n: np.var([x for m in HUTCHINSON_PER_LAYER for x in samples[m][n]], ddof=1) for n in layers}
    var = {m: pooled for m in HUTCHINSON_PER_LAYER}
    for m in ("ours", "all-layers"):
        var[m] = {n: np.var(samples[m][n], ddof=1) for n in layers}
    t = {m: statistics.median(v) for m, v in secs.items()}
    live = [n for n in layers if pooled[n] > 0 and var["ours"][n] > 0]
    ratios = {}
    for m in rounds:
        if m != "ours":
            per_layer = [t[m] * var[m][n] / (t["ours"] * var["ours"][n]) for n in live]
            ratios[m] = {"median": float(np.median(per_layer)), "min": float(np.min(per_layer)),
                         "max": float(np.max(per_layer))}
    var_ratio = [var["all-layers"][n] / pooled[n] for n in live]
    return {"case": name, "layers": len(layers), "k": k, "rounds": rounds, "seconds_per_sample": t,
            "equal_se_speedup_of_ours_over": ratios,
            "all_layers_variance_over_per_layer": {"median": float(np.median(var_ratio)),
                                                   "min": float(np.min(var_ratio)), "max": float(np.max(var_ratio))},
            "negative_mean_traces": {m: int(sum(np.mean(samples[m][n]) < 0 for n in layers)) for m in rounds},
            "layers_zero_variance": len(layers) - len(live)}


def bench_ilp(repeats: int) -> dict:
    """ILP solve time at DETR-R50's size: its 114 allocated layers with their real parameter counts, Omega = a
    log-uniform sensitivity over six decades x n 4^-b, candidate bits 3-6, targets 4 and 5."""
    import dataclasses

    from detr_ptq.models import build_detr, get_preset
    from detr_ptq.ptq.ilp import solve_bit_allocation
    from detr_ptq.ptq.sensitivity import DEFAULT_EXCLUDE, is_excluded

    model, _, _ = build_detr(dataclasses.replace(get_preset("detr_r50")))
    layers = {n: m for n, m in quantizable_layers(model).items() if not is_excluded(n, DEFAULT_EXCLUDE)}
    params = np.asarray([sum(w.numel() for w in (m.quantized_weights() if hasattr(m, "quantized_weights")
                                                  else [m.weight])) for m in layers.values()], dtype=float)
    rng = np.random.default_rng(0)
    bits = [3, 4, 5, 6]
    secs = []
    for target in (4.0, 5.0):
        for _ in range(repeats):
            sens = 10 ** rng.uniform(-6, 0, len(params))
            err = params[:, None] * 4.0 ** -(np.asarray(bits)[None, :] - 3)
            secs.append(solve_bit_allocation(sens[:, None] * err, params, bits, target)["seconds"])
    return {"layers": len(params), "bits": bits, "solves": len(secs), "median_seconds": float(np.median(secs)),
            "max_seconds": float(np.max(secs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short settings for `make bench` (< 1 minute)")
    p.add_argument("--cases", nargs="+", default=["detr_tiny", "resnet20"], choices=["detr_tiny", "resnet20"])
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the per-layer Hutchinson methods")
    p.add_argument("--ours-rounds", type=int, default=8, help="Hutch++ estimates (each 3k products per layer)")
    p.add_argument("--all-layer-rounds", type=int, default=40, help="rounds of the all-layers probe (cheap)")
    p.add_argument("--probes-per-batch", type=int, default=4, help="k: batched probes (Hutch++: 3k products)")
    p.add_argument("--detr-images", type=int, default=4)
    p.add_argument("--cifar-images", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ilp-repeats", type=int, default=5, help="ILP solves per target at DETR-R50's size (0: skip)")
    p.add_argument("--out", default="runs/bench_hessian.json")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.ours_rounds, args.all_layer_rounds = 1, 3, 6
        args.detr_images, args.cifar_images, args.ilp_repeats = 2, 32, 1
    torch.set_num_threads(args.threads)
    builders = {"detr_tiny": lambda: detr_case(args.detr_images), "resnet20": lambda: resnet20_case(args.cifar_images)}
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "quick": args.quick, "cases": []}
    rounds = {"loop": args.rounds, "loop-reuse": args.rounds, "per-layer": args.rounds, "ours": args.ours_rounds,
              "all-layers": args.all_layer_rounds}
    others = ("loop", "loop-reuse", "per-layer", "all-layers")
    print("| case | layers | s per probe: " + ", ".join(others) + "; s per Hutch++ estimate | equal-SE speed-up of "
          "ours (Hutch++) over: " + ", ".join(others) + " (median over layers [min]) | all-layers var / per-layer "
          "var (median) |")
    print("|---|---:|---|---|---:|")
    for case in args.cases:
        loss_fn, layers = builders[case]()
        r = bench_case(case, loss_fn, layers, rounds, args.probes_per_batch)
        result["cases"].append(r)
        t, s = r["seconds_per_sample"], r["equal_se_speedup_of_ours_over"]
        print(f"| {case} | {r['layers']} | " + ", ".join(f"{t[m]:.3f}" for m in others) + f"; {t['ours']:.2f} | "
              + ", ".join(f"{s[m]['median']:.1f}x [{s[m]['min']:.1f}x]" for m in others)
              + f" | {r['all_layers_variance_over_per_layer']['median']:.1f} |", flush=True)
        r["equal_se_speedup_of_per_layer_over_loop"] = pl = t["loop"] / t["per-layer"]  # same sample variance
        print(f"|  | per-layer mode (graph reuse + {args.probes_per_batch} batched probes) over the loop at equal SE: "
              f"{pl:.1f}x; over loop-reuse: {t['loop-reuse'] / t['per-layer']:.1f}x |  |  |  |", flush=True)
    if args.ilp_repeats:
        result["ilp"] = ilp = bench_ilp(args.ilp_repeats)
        print(f"ILP {ilp['layers']} layers x {len(ilp['bits'])} bits (two exact solves each): median "
              f"{ilp['median_seconds'] * 1e3:.0f} ms, max {ilp['max_seconds'] * 1e3:.0f} ms over {ilp['solves']}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

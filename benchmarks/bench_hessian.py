"""Benchmark: per-layer Hessian traces at EQUAL standard error, our estimators vs a per-layer PyHessian-style loop.

    .venv/bin/python benchmarks/bench_hessian.py --quick           # about a minute on an idle core (make bench)
    .venv/bin/python benchmarks/bench_hessian.py --out runs/bench_hessian.json   # more rounds, with Hutch++

Models: the reference detector (``detr_ptq/assets/detr_tiny_digits.pth``, its ``output-quant`` sensitivity loss on
real digits images; ``detr_tiny_float``: its ``output-float`` loss) and ResNet-20 (``$GMPQ_DATA/cifar_resnets``,
cross-entropy on real CIFAR-10 images). One
micro-batch each, the same for every method. Estimators of ``Tr(H_ll)`` for every layer ``l``:

- ``loop``: the per-layer PyHessian-style loop: for each layer, a forward, a first backward with ``create_graph``
  and one Hessian-vector product with a Rademacher probe on that layer alone (the reference);
- ``loop-reuse``: the same probes, the gradient graph built once per batch and reused by every layer (PyHessian
  reuses ``gradsH`` this way);
- ``per-layer``: ``hutchinson.probe_per_layer`` (mode ``per-layer``, the default): graph reuse plus the
  ``--probes-per-batch`` probes of a layer batched in one double backward (``is_grads_batched``);
- ``grouped``: mode ``grouped``: ``hutchinson.probe_groups`` over the groups that ``pilot_groups`` forms
  (layers whose measured cross-blocks add at most ``--group-inflation`` x the per-layer variance share one
  batched double backward, each with its own probe). The pilot's time is charged to every sample:
  ``pilot seconds / --run-probes`` (the probes per layer of a run, ``HutchinsonConfig.max_probes``) per sample;
- ``all-layers``: one probe over all layers, one product per probe (mode ``all``);
- ``hutch++``: mode ``hutch++``, k = ``--probes-per-batch`` (3k products per layer); a sample is one estimate;
- ``gauss-newton``: mode ``gauss-newton`` (``detr_ptq.ptq.gauss_newton``): per step, ``--gn-probes`` output-space
  probes for every layer (one batched first-order backward) plus the residual part, one probe per layer, charged
  on every ``--residual-every``-th step. A round measures both parts and their sample variances; the equal-SE cost
  of a step is ``(t_gn + t_res / every) x (var_gn / gn_probes + var_res x every)``. Without a residual part
  (``detr_tiny_float``: student == teacher) it is ``t_gn x var_gn / gn_probes``.

``loop``, ``loop-reuse`` and ``per-layer`` draw the same kind of sample (``v_l^T H_ll v_l``), so their per-probe
variances are equal and are pooled; the others have their own, measured per layer. Time to reach a standard error
s on layer l is ``seconds per sample x variance of a sample / s^2``, so the equal-SE speed-up of X over the loop
on layer l is ``(t_loop var_loop,l) / (t_X var_X,l)``: printed as the median and the minimum over layers.
Variances from few samples are rough (``--quick``: 6 pooled, 8 grouped per layer), so the minimum over 45 layers
is biased low. Methods run in interleaved rounds; times are medians over rounds of process CPU seconds, one thread (the
machine is shared: CPU time is far less disturbed by other processes than wall time). The profile splits one
round into forward, first backward (``create_graph``) and each layer's or group's product.
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

from detr_ptq.ptq.gauss_newton import RowLoss, output_factors, probe_gauss_newton, residual_loss
from detr_ptq.ptq.hutchinson import (
    HutchinsonConfig,
    hutchpp_per_layer,
    pilot_groups,
    probe_all_layers,
    probe_groups,
    probe_one_layer,
    probe_per_layer,
    rademacher_like,
    traced_weights,
)
from gmpq.io import atomic_write_json
from gmpq.quant.modules import quantizable_layers

ROOT = Path(__file__).resolve().parent.parent
HUTCHINSON_PER_LAYER = ("loop", "loop-reuse", "per-layer")
METHODS = ("loop", "loop-reuse", "per-layer", "grouped", "all-layers", "hutch++", "gauss-newton")


def detr_case(images: int, metric: str = "output-quant") -> tuple[Callable[[], torch.Tensor], dict, Callable]:
    """The reference detector's ``metric`` loss (Smooth-L1 box term) on ``images`` digits training images."""
    from detr_ptq.data.digits_coco import make_digits_coco
    from detr_ptq.ptq.apply import load_float
    from detr_ptq.ptq.calibset import CalibConfig, calibration_loader, load_batches
    from detr_ptq.ptq.sensitivity import SensitivityConfig, metric_loss

    model, criterion, _, _ = load_float(ROOT / "detr_ptq/assets/detr_tiny_digits.pth")
    with tempfile.TemporaryDirectory() as d:
        make_digits_coco(d, seed=0, num_train=images, num_val=0)
        loader, _ = calibration_loader(CalibConfig(data_dir=d, num_images=images, batch_size=images), 96, 96)
        batch = load_batches(loader)[0]
    student, loss_fn = metric_loss(metric, model, criterion, SensitivityConfig())
    return (lambda: loss_fn(batch)), traced_weights(student, quantizable_layers(student)), lambda: loss_fn.rows(batch)


def resnet20_case(images: int) -> tuple[Callable[[], torch.Tensor], dict]:
    """Pretrained ResNet-20, cross-entropy on the first ``images`` CIFAR-10 training images (ImageNet mean/std)."""
    from gmpq.models import create_model

    data = Path(os.environ.get("GMPQ_DATA", ROOT.parent / "shared" / "data"))
    model = create_model("resnet20", weights=str(data / "cifar_resnets/resnet20-12fca82f.th")).eval()
    raw = np.load(data / "cifar10/cifar10_original_subset.npz")
    x = torch.tensor(raw["x_train"][:images]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    y = torch.tensor(raw["y_train"][:images]).long()
    onehot = torch.nn.functional.one_hot(y, 10).float()

    def phi(row: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # one image's cross-entropy / images
        return -(target * torch.log_softmax(row, -1)).sum() / images
    return ((lambda: torch.nn.functional.cross_entropy(model(x), y)), traced_weights(model, quantizable_layers(model)),
            lambda: RowLoss(model(x), onehot, phi))


def one_round(method: str, loss_fn, layers: dict, gen: torch.Generator, k: int, groups: list[list[str]],
              times: dict) -> tuple[float, dict, int]:
    """-> (CPU seconds, {layer: [samples]}, samples per layer) for one round of ``method``. A Hutchinson sample is
    one probe's ``v^T H v`` (grouped: ``v_l . (H v_G)_l``); a Hutch++ sample is one whole estimate. ``times``
    receives the profile of the ``per-layer`` and ``grouped`` rounds (forward, first backward, each product)."""
    t0 = time.process_time()
    if method == "loop":
        out = {n: [probe_one_layer(loss_fn, ps, rademacher_like(ps, gen))] for n, ps in layers.items()}
    elif method == "all-layers":
        vec = {n: rademacher_like(ps, gen) for n, ps in layers.items()}
        out = {n: [x] for n, x in probe_all_layers(loss_fn(), layers, vec).items()}
    elif method == "hutch++":
        out = {n: [x] for n, x in hutchpp_per_layer(loss_fn(), layers, gen, k).items()}
    else:
        loss = loss_fn()
        times["forward"] = time.process_time() - t0
        probes = 1 if method == "loop-reuse" else k
        split = groups if method == "grouped" else [[n] for n in layers]
        out = {n: s.tolist() for n, s in probe_groups(loss, layers, split, gen, probes, times).items()}
    seconds = time.process_time() - t0
    return seconds, out, len(next(iter(out.values())))


def gn_round(rows_fn, layers: dict, gen: torch.Generator, probes: int) -> tuple[float, float, dict, dict | None]:
    """One Gauss-Newton step, both parts: ``(CPU s of the Gauss-Newton part, CPU s of the residual part (one probe
    per layer), {layer: [probes] samples}, {layer: [one sample]} or None without a residual part)``."""
    t0 = time.process_time()
    loss = rows_fn()
    a_pos, a_neg, g = output_factors(loss)
    gn = {n: x.tolist() for n, x in probe_gauss_newton(loss.rows, layers, (a_pos, a_neg), gen, probes).items()}
    t1 = time.process_time()
    r = residual_loss(loss, g)
    res = None if r is None else {n: x.tolist() for n, x in probe_per_layer(r, layers, gen).items()}
    return t1 - t0, time.process_time() - t1, gn, res


def gn_speedup(rounds: list, pooled: dict, t_loop: float, probes: int, every: int) -> dict:
    """Equal-SE speed-up of mode gauss-newton over the loop per layer (see the module docstring); ``pooled``: the
    per-layer Hutchinson sample variance, ``t_loop``: the loop's CPU s per sample."""
    t_gn = statistics.median(r[0] for r in rounds)
    t_res = statistics.median(r[1] for r in rounds)
    has_res = rounds[0][3] is not None
    speedup, var_ratio, res_ratio, negative = [], [], [], 0
    for n, v_loop in pooled.items():
        gn = [x for r in rounds for x in r[2][n]]
        res = [x for r in rounds for x in r[3][n]] if has_res else [0.0, 0.0]
        v_gn, v_res = float(np.var(gn, ddof=1)), float(np.var(res, ddof=1))
        negative += int(np.mean(gn) + np.mean(res) < 0)
        step = (t_gn + (t_res / every if has_res else 0.0)) * (v_gn / probes + v_res * every)
        if v_loop > 0 and v_gn > 0:
            speedup.append(t_loop * v_loop / step)
            var_ratio.append(v_gn / v_loop)
            res_ratio.append(v_res / v_loop)
    return {"speedup": _spread(speedup), "seconds_gn": t_gn, "seconds_residual": t_res if has_res else 0.0,
            "residual": has_res, "probes": probes, "residual_every": every,
            "var_gn_over_per_layer": _spread(var_ratio),
            "var_residual_over_per_layer": _spread(res_ratio) if has_res else None, "negative_mean_traces": negative}


def bench_case(name: str, loss_fn, layers: dict, rounds: dict[str, int], k: int, inflation: float,
               run_probes: int, rows_fn=None, gn_probes: int = 16, residual_every: int = 4) -> dict:
    """Pilot and grouping, then interleaved rounds of every method; per layer, the equal-SE cost ``seconds per
    sample x variance of a sample`` and the loop's over it; the profile of one round."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.process_time()
    groups = pilot_groups(loss_fn(), loss_fn(), layers, gen, inflation)
    pilot = time.process_time() - t0
    rounds = {m: r for m, r in rounds.items() if r > 0}
    gn_rounds = []
    samples = {m: {n: [] for n in layers} for m in rounds}
    secs: dict[str, list[float]] = {m: [] for m in rounds}
    profile: dict[str, list[dict]] = {"per-layer": [], "grouped": []}
    one_round("grouped", loss_fn, layers, gen, k, groups, {})  # warm-up
    for r in range(max(rounds.values())):
        for m in rounds:
            if r < rounds[m] and m == "gauss-newton":
                gn_rounds.append(gn_round(rows_fn, layers, gen, gn_probes))
            elif r < rounds[m]:
                times: dict = {}
                s, out, per_round = one_round(m, loss_fn, layers, gen, k, groups, times)
                secs[m].append(s / per_round)
                if m in profile:
                    profile[m].append(times)
                for n, xs in out.items():
                    samples[m][n] += xs
    pooled = {n: np.var([x for m in HUTCHINSON_PER_LAYER for x in samples[m][n]], ddof=1) for n in layers}
    var = {m: pooled for m in HUTCHINSON_PER_LAYER}
    for m in ("grouped", "all-layers", "hutch++"):
        if m in rounds:
            var[m] = {n: np.var(samples[m][n], ddof=1) for n in layers}
    t = {m: statistics.median(v) for m, v in secs.items() if v}
    t["grouped"] += pilot / run_probes
    live = [n for n in layers if pooled[n] > 0 and all(var[m][n] > 0 for m in var)]
    ratios = {m: _spread([t["loop"] * pooled[n] / (t[m] * var[m][n]) for n in live]) for m in rounds
              if m not in ("loop", "gauss-newton")}
    gn = gn_speedup(gn_rounds, pooled, t["loop"], gn_probes, residual_every) if gn_rounds else None
    if gn is not None:
        ratios["gauss-newton"] = gn["speedup"]
        t["gauss-newton"] = (gn["seconds_gn"] + gn["seconds_residual"] / residual_every) / gn_probes
    return {"case": name, "layers": len(layers), "k": k, "rounds": rounds, "group_inflation": inflation,
            "groups": [g for g in groups if len(g) > 1], "num_groups": len(groups), "pilot_seconds": pilot,
            "run_probes": run_probes, "seconds_per_sample": t, "equal_se_speedup_over_loop": ratios,
            "grouped_variance_over_per_layer": _spread([var["grouped"][n] / pooled[n] for n in live]),
            "all_layers_variance_over_per_layer": _spread([var["all-layers"][n] / pooled[n] for n in live]),
            "negative_mean_traces": {m: (gn["negative_mean_traces"] if m == "gauss-newton" else
                                         int(sum(np.mean(samples[m][n]) < 0 for n in layers))) for m in rounds},
            "gauss_newton": gn,
            "layers_zero_variance": len(layers) - len(live),
            "profile": {m: _median_times(p) for m, p in profile.items()}}


def _spread(xs: list[float]) -> dict:
    return {"median": float(np.median(xs)), "min": float(np.min(xs)), "max": float(np.max(xs))}


def _median_times(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]} if rounds else {}


def print_profile(r: dict, loop_seconds: float) -> None:
    """Where one round's CPU time goes: forward, first backward with create_graph, the products."""
    for m, p in r["profile"].items():
        hvps = {key[4:]: v for key, v in p.items() if key.startswith("hvp:")}
        total = p["forward"] + p["first_backward"] + sum(hvps.values())
        top = sorted(hvps.items(), key=lambda kv: -kv[1])[:4]
        print(f"  profile {m} ({len(hvps)} products of {r['k']} batched probes): forward {p['forward']:.3f} s, "
              f"first backward {p['first_backward']:.3f} s, products {sum(hvps.values()):.2f} s "
              f"({100 * sum(hvps.values()) / total:.0f}%); largest: "
              + ", ".join(f"{n} {v:.2f} s" for n, v in top))
    p = r["profile"]["per-layer"]
    fb = p["forward"] + p["first_backward"]
    print(f"  profile loop (one probe per layer): {r['layers']} x (forward + first backward) = {r['layers'] * fb:.2f} s"
          f" of {loop_seconds:.2f} s measured ({100 * r['layers'] * fb / loop_seconds:.0f}%); grouped's pilot "
          f"{r['pilot_seconds']:.2f} s, once per run ({r['pilot_seconds'] / r['run_probes']:.3f} s per sample)")


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
    p.add_argument("--quick", action="store_true", help="short settings for `make bench` (about a minute)")
    p.add_argument("--cases", nargs="+", default=["detr_tiny", "detr_tiny_float", "resnet20"],
                   choices=["detr_tiny", "detr_tiny_float", "resnet20"])
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the per-layer Hutchinson methods")
    p.add_argument("--grouped-rounds", type=int, default=6, help="rounds of grouped (k samples each)")
    p.add_argument("--hutchpp-rounds", type=int, default=6, help="Hutch++ estimates (3k products each; 0: skip)")
    p.add_argument("--all-layer-rounds", type=int, default=40, help="rounds of the all-layers probe (cheap)")
    p.add_argument("--probes-per-batch", type=int, default=HutchinsonConfig.probes_per_batch,
                   help="k: batched probes (Hutch++: 3k products)")
    p.add_argument("--gn-rounds", type=int, default=6, help="rounds of gauss-newton (both parts each)")
    p.add_argument("--gn-probes", type=int, default=16, help="gauss-newton: output-space probes per step")
    p.add_argument("--residual-every", type=int, default=HutchinsonConfig.residual_every,
                   help="gauss-newton: the residual part is probed on one step in this many")
    p.add_argument("--group-inflation", type=float, default=HutchinsonConfig.group_inflation)
    p.add_argument("--run-probes", type=int, default=HutchinsonConfig.max_probes,
                   help="probes per layer of a run, over which grouped's pilot is charged")
    p.add_argument("--detr-images", type=int, default=4)
    p.add_argument("--cifar-images", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ilp-repeats", type=int, default=5, help="ILP solves per target at DETR-R50's size (0: skip)")
    p.add_argument("--out", default="runs/bench_hessian.json")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.grouped_rounds, args.hutchpp_rounds, args.all_layer_rounds, args.gn_rounds = 1, 2, 0, 6, 3
        args.detr_images, args.cifar_images, args.ilp_repeats = 2, 32, 1
    torch.set_num_threads(args.threads)
    builders = {"detr_tiny": lambda: detr_case(args.detr_images),
                "detr_tiny_float": lambda: detr_case(args.detr_images, "output-float"),
                "resnet20": lambda: resnet20_case(args.cifar_images)}
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "quick": args.quick, "cases": []}
    rounds = {"loop": args.rounds, "loop-reuse": args.rounds, "per-layer": args.rounds, "grouped": args.grouped_rounds,
              "all-layers": args.all_layer_rounds, "hutch++": args.hutchpp_rounds, "gauss-newton": args.gn_rounds}
    methods = [m for m in METHODS if rounds[m] > 0]
    print(f"| case | layers | CPU s per sample: {', '.join(methods)} | equal-SE speed-up over the loop: "
          f"{', '.join(methods[1:])} (median over layers [min]) | grouped: groups, var / per-layer var "
          f"(median [max]) |")
    print("|---|---:|---|---|---|")
    for case in args.cases:
        loss_fn, layers, rows_fn = builders[case]()
        r = bench_case(case, loss_fn, layers, rounds, args.probes_per_batch, args.group_inflation, args.run_probes,
                       rows_fn, args.gn_probes, args.residual_every)
        result["cases"].append(r)
        t, s, v = r["seconds_per_sample"], r["equal_se_speedup_over_loop"], r["grouped_variance_over_per_layer"]
        print(f"| {case} | {r['layers']} | " + ", ".join(f"{t[m]:.3f}" for m in methods) + " | "
              + ", ".join(f"{s[m]['median']:.1f}x [{s[m]['min']:.1f}x]" for m in methods[1:])
              + f" | {r['num_groups']}, {v['median']:.2f} [{v['max']:.2f}] |", flush=True)
        r["equal_se_speedup_of_per_layer_over_loop"] = t["loop"] / t["per-layer"]  # same sample variance
    for r in result["cases"]:  # after the table, so that it stays one table
        print(f"{r['case']}: per-layer mode (graph reuse + {args.probes_per_batch} batched probes) over the loop at "
              f"equal SE: {r['equal_se_speedup_of_per_layer_over_loop']:.1f}x; all-layers var / per-layer var: "
              f"{r['all_layers_variance_over_per_layer']['median']:.1f} (median); layers with a negative mean: "
              + ", ".join(f"{m} {c}" for m, c in r["negative_mean_traces"].items()))
        print_profile(r, r["seconds_per_sample"]["loop"])
        gn = r["gauss_newton"]
        if gn is not None:
            res = (f"residual part (1 probe per layer) {gn['seconds_residual']:.2f} s, charged every "
                   f"{gn['residual_every']} steps, its sample var / per-layer var "
                   f"{gn['var_residual_over_per_layer']['median']:.2g} (median)" if gn["residual"]
                   else "no residual part (gradient 0 at student == teacher)")
            print(f"  gauss-newton: {gn['probes']} output-space probes for all layers {gn['seconds_gn']:.2f} s; "
                  f"{res}; Gauss-Newton sample var / per-layer var {gn['var_gn_over_per_layer']['median']:.2f} "
                  f"(median [max {gn['var_gn_over_per_layer']['max']:.2f}])")
    if args.ilp_repeats:
        result["ilp"] = ilp = bench_ilp(args.ilp_repeats)
        print(f"ILP {ilp['layers']} layers x {len(ilp['bits'])} bits (two exact solves each): median "
              f"{ilp['median_seconds'] * 1e3:.0f} ms, max {ilp['max_seconds'] * 1e3:.0f} ms over {ilp['solves']}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

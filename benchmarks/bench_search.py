"""Cost of the GMPQ search step: time per training step and peak memory of

    (a) the float model, (b) the same model with a fixed uniform W4A4 policy (fake-quant QAT),
    (c) the hypernet without R_G (EdMIPS), (d) the hypernet with R_G (GMPQ, closed-form CAM for GAP+linear heads),
    (d') the hypernet with R_G through autograd Grad-CAM (create_graph, the general path),

on ResNet-20, batch 128, 32x32 (random inputs: the step cost does not depend on pixel values), printed as ratios
to (b). Each variant runs in its own fresh process so peak memory is not shared: on CPU, peak memory is the growth
of the process's maximum resident set size (``ru_maxrss``) over its RSS once the model is built (before the first,
untimed warm-up step); on CUDA, it is the growth of ``torch.cuda.max_memory_allocated`` over the same baseline.

    python benchmarks/bench_search.py [--model resnet20] [--batch 128] [--steps 5] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

VARIANTS = {"a": "float", "b": "fixed W4A4 QAT", "c": "hypernet, no R_G", "d": "hypernet + R_G (CAM)",
            "d'": "hypernet + R_G (autograd Grad-CAM)"}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _build(variant: str, model_name: str, device, x, y):
    """Return ``step()`` that runs one forward + backward + optimizer step for ``variant``."""
    import torch

    from gmpq.models import create_model, model_spec
    from gmpq.quant import apply_policy, calibrate, uniform_policy
    from gmpq.quant.cost import measure_macs
    from gmpq.quant.modules import quantizable_layers
    from gmpq.runtime.terms import weighted_total
    from gmpq.search import losses as L
    from gmpq.search.config import LossConfig, SearchConfig
    from gmpq.search.export import fixed_bops
    from gmpq.search.hypernet import build_hypernet, calibrate_hypernet, mixed_layers
    from gmpq.search.setup import freeze
    from gmpq.search.train import SearchState, build_optimizer, compute_losses

    spec = model_spec(model_name)
    model = create_model(model_name).to(device)
    keep = (spec.first_layer, spec.classifier)
    if variant in ("a", "b"):
        if variant == "b":
            apply_policy(model, uniform_policy(model, model_name, 4, 4, keep_full_precision=keep))
            calibrate(model, [x], num_batches=1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    eta = 0.0 if variant == "c" else 1.0
    cfg = SearchConfig(model=model_name, loss=LossConfig(eta=eta, cam_fast_path=variant != "d'"))
    teacher = freeze(create_model(model_name).to(device))
    model.load_state_dict(teacher.state_dict())
    macs = measure_macs(teacher, spec.input_size)
    build_hypernet(model, [2, 3, 4], [2, 3, 4], exclude=keep)
    model.to(device)
    calibrate_hypernet(model, [x], num_batches=1)
    fast = cfg.loss.cam_fast_path and spec.head == "gap_linear"
    s = SearchState(cfg=cfg, model=model.train(), teacher=teacher, macs=macs,
                    fixed_bops=fixed_bops(list(quantizable_layers(teacher)), list(mixed_layers(model)), macs),
                    layer=spec.feature_layer, fc_student=model.get_submodule(spec.classifier) if fast else None,
                    fc_teacher=teacher.get_submodule(spec.classifier) if fast else None)
    opt = build_optimizer(model, cfg)
    weights = L.loss_weights(cfg.loss.zeta, cfg.loss.eta)

    def step():
        terms, _ = compute_losses(s, x, y)
        opt.zero_grad(set_to_none=True)
        weighted_total(terms, weights).backward()
        opt.step()
    return step


def _worker(variant: str, args, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    spec_c, spec_h = 3, 32
    x = torch.randn(args.batch, spec_c, spec_h, spec_h, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    step = _build(variant, args.model, device, x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # baseline after the model is built, before any step: the peak then counts activations, gradients and optimizer
    # state of the training step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kb() * 1024
    step()  # warm-up (allocator, lazy init); not timed
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put((variant, statistics.median(times), max(peak, 0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="a,b,c,d,d'")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for v in args.variants.split(","):
        q = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(v, args, q))
        proc.start()
        results[v] = q.get()[1:]
        proc.join()
    mem_kind = "max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss growth"
    print(f"{args.model}, batch {args.batch}, 32x32, {args.device}, {args.threads} thread(s), median of {args.steps} "
          f"steps; peak memory = {mem_kind}")
    print("| variant | s/step | peak MB | time / (b) | memory / (b) |\n|---|---:|---:|---:|---:|")
    tb, mb = results.get("b", next(iter(results.values())))
    for v, (t, m) in results.items():
        print(f"| ({v}) {VARIANTS[v]} | {t:.3f} | {m / 1e6:.0f} | {t / tb:.2f} | {m / max(mb, 1):.2f} |")


if __name__ == "__main__":
    main()

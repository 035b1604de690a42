"""Cost of the GMPQ search step: time per training step and peak memory of

    (a) the float model, (b) the same model with a fixed uniform W4A4 policy (fake-quant QAT),
    (c) the hypernet without R_G (EdMIPS), (d) the hypernet with R_G (GMPQ, closed-form CAM for GAP+linear heads),
    (d') the hypernet with R_G through autograd Grad-CAM (create_graph, the general path),

printed as ratios to (b), on random 32 x 32 inputs (the step cost does not depend on pixel values). The hypernet
variants run once per mixed-layer implementation in ``--impl`` (``reference``: the explicit sum of quantized copies;
``fused``: ``gmpq.search.fused``), so before/after are measured side by side in ONE run. ``--stem search`` builds the
model's search-time variant (e.g. the CIFAR-stem ResNet-18). Each variant runs in its own fresh process so peak memory
is not shared. Time: the median over ``--steps`` steps after one untimed warm-up step, in CPU time of the process on
CPU (``--clock cpu``: steadier than wall time on a shared machine) or wall time on CUDA. Peak memory: on CPU, the peak
resident set (``VmHWM``, reset once the model is built and calibrated, so set-up transients do not count) minus the
RSS at that point; on CUDA, the growth of ``torch.cuda.max_memory_allocated`` over the same baseline.

``--profile`` instead profiles ``--steps`` steps of each variant after a warm-up (``torch.profiler``): the ops by self
CPU time, the time inside each part of the step (``record_function`` scopes: teacher, student forward, attribution,
backward, optimizer) and the memory each module type keeps for the backward pass (saved-tensor hooks; a tensor saved
by several ops counts once).

    python benchmarks/bench_search.py [--model resnet20] [--batch 128] [--steps 5] [--threads 2] [--device cpu]
        [--stem deploy|search] [--bits 2,3,4] [--impl reference,fused] [--variants a,b,c,d,d'] [--clock cpu|wall]
        [--profile]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from collections import defaultdict

VARIANTS = {"a": "float", "b": "fixed W4A4 QAT", "c": "hypernet, no R_G", "d": "hypernet + R_G (CAM)",
            "d'": "hypernet + R_G (autograd Grad-CAM)"}
SCOPES = ("teacher", "student_forward", "attribution", "backward", "optimizer")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) so that set-up transients (calibration) do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _model(args):
    from gmpq.models import create_model, create_search_model

    return create_search_model(args.model, 10) if args.stem == "search" else create_model(args.model, 10)


def _build(variant: str, impl: str, args, device, x, y):
    """Return ``(step, model)``: ``step()`` runs one forward + backward + optimizer step for ``variant``."""
    import torch
    from torch.profiler import record_function

    from gmpq.models import model_spec
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

    spec = model_spec(args.model)
    model = _model(args).to(device)
    keep = (spec.first_layer, spec.classifier)
    if variant in ("a", "b"):
        if variant == "b":
            apply_policy(model, uniform_policy(model, args.model, 4, 4, keep_full_precision=keep))
            calibrate(model, [x], num_batches=1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()

        def step():
            with record_function("student_forward"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                opt.step()
        return step, model

    eta = 0.0 if variant == "c" else 1.0
    cfg = SearchConfig(model=args.model, loss=LossConfig(eta=eta, cam_fast_path=variant != "d'"))
    teacher = freeze(_model(args).to(device))
    model.load_state_dict(teacher.state_dict())
    macs = measure_macs(teacher, tuple(x.shape[1:]))
    bits = [int(b) for b in args.bits.split(",")]
    build_hypernet(model, bits, bits, exclude=keep, impl=impl)
    model.to(device)
    calibrate_hypernet(model, [x], num_batches=1)
    fast = cfg.loss.cam_fast_path and spec.head == "gap_linear"
    s = SearchState(cfg=cfg, model=model.train(), teacher=teacher if eta > 0 else None, macs=macs,
                    fixed_bops=fixed_bops(list(quantizable_layers(teacher)), list(mixed_layers(model)), macs),
                    layer=spec.feature_layer, fc_student=model.get_submodule(spec.classifier) if fast else None,
                    fc_teacher=teacher.get_submodule(spec.classifier) if fast else None)
    opt = build_optimizer(model, cfg)
    weights = L.loss_weights(cfg.loss.zeta, cfg.loss.eta)

    def step():
        terms, _ = compute_losses(s, x, y)
        opt.zero_grad(set_to_none=True)
        with record_function("backward"):
            weighted_total(terms, weights).backward()
        with record_function("optimizer"):
            opt.step()
    return step, model


def _saved_bytes_by_module(model, step) -> dict[str, float]:
    """MB kept for the backward pass during one ``step()``, by the type of the innermost module saving it (the
    teacher and the losses count as outside modules)."""
    import torch

    stack: list[str] = ["(outside modules)"]
    seen: set[int] = set()
    out: dict[str, float] = defaultdict(float)
    hooks = []
    def enter(mod, inp) -> None:
        stack.append(type(mod).__name__)

    def leave(mod, inp, res) -> None:
        stack.pop()

    for m in model.modules():
        if m is not model:
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            out[stack[-1]] += t.untyped_storage().nbytes() / 1e6
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for h in hooks:
            h.remove()
    return dict(out)


def _profile(step, model, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    scopes = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in SCOPES}
    lines = [f"time by part of the step (ms per step; total self CPU {total / args.steps:.0f} ms/step):",
             "  " + ", ".join(f"{k} {v / args.steps:.0f}" for k, v in scopes.items())]
    cuda = args.device.startswith("cuda")

    def self_time(e) -> float:  # us: the device's time on CUDA, the CPU's otherwise
        return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

    if cuda:
        total = sum(self_time(e) for e in events) / 1e3
    lines.append(f"top ops by self {'GPU' if cuda else 'CPU'} time (ms per step, % of the step's total):")
    ops = sorted((e for e in events if e.key not in SCOPES), key=lambda e: -self_time(e))
    for e in ops[:args.top]:
        ms = self_time(e) / 1e3
        lines.append(f"  {e.key:<40} {ms / args.steps:8.1f} {100 * ms / total:5.1f}%  calls/step "
                     f"{e.count // args.steps}")
    saved = _saved_bytes_by_module(model, step)
    lines.append(f"saved for backward, MB by module type (one step; total {sum(saved.values()):.0f} MB):")
    lines.append("  " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(saved.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def _worker(variant: str, impl: str, args, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    step, model = _build(variant, impl, args, device, x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # baseline after the model is built, before any step: the peak then counts activations, gradients and optimizer
    # state of the training step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kb("VmRSS") * 1024
        hwm = _reset_peak_rss()
    step()  # warm-up (allocator, lazy init); not timed
    if args.profile:
        queue.put((variant, impl, _profile(step, model, args)))
        return
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = []
    for _ in range(args.steps):
        sync()
        t0 = clock()
        step()
        sync()
        times.append(clock() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    elif hwm:
        peak = _status_kb("VmHWM") * 1024 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put((variant, impl, (statistics.median(times), max(peak, 0))))


def _run(variant: str, impl: str, args):
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_worker, args=(variant, impl, args, q))
    proc.start()
    result = q.get()[2]
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--stem", default="deploy", choices=["deploy", "search"])
    p.add_argument("--bits", default="2,3,4", help="candidate bits (weights and activations) of the hypernet")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", default=None, choices=["cpu", "wall"],
                   help="step time: the process's CPU time (default on CPU: steadier on a shared machine) or wall time "
                        "(default on CUDA)")
    p.add_argument("--variants", default="a,b,c,d,d'")
    p.add_argument("--impl", default="reference,fused", help="mixed-layer implementations of the hypernet variants")
    p.add_argument("--profile", action="store_true", help="print a profile of each variant instead of timings")
    p.add_argument("--top", type=int, default=12, help="ops listed per profile")
    args = p.parse_args()
    args.clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    runs = [(v, i) for v in args.variants.split(",") for i in (args.impl.split(",") if v in ("c", "d", "d'")
                                                              else ["-"])]
    head = (f"{args.model} ({args.stem} stem), bits {{{args.bits}}}, batch {args.batch}, 32x32, {args.device}, "
            f"{args.threads} thread(s)")
    if args.profile:
        for v, i in runs:
            print(f"== profile: {head}, ({v}) {VARIANTS[v]}{'' if i == '-' else ' [' + i + ']'}, "
                  f"{args.steps} steps ==\n{_run(v, i, args)}", flush=True)
        return
    results = {(v, i): _run(v, i, args) for v, i in runs}
    mem_kind = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM) growth"
    print(f"{head}, median of {args.steps} steps ({args.clock} time); peak memory = {mem_kind} over the built model")
    print("| variant | s/step | peak MB | time / (b) | memory / (b) |\n|---|---:|---:|---:|---:|")
    tb, mb = results.get(("b", "-"), next(iter(results.values())))
    for (v, i), (t, m) in results.items():
        label = f"({v}) {VARIANTS[v]}" + ("" if i == "-" else f" [{i}]")
        print(f"| {label} | {t:.3f} | {m / 1e6:.0f} | {t / tb:.2f} | {m / max(mb, 1):.2f} |")


if __name__ == "__main__":
    main()

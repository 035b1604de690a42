"""onnxruntime CPU latency of several ONNX models, measured side by side.

Timing on a shared machine drifts, so models are never timed one after the other: each round runs every model
once (in a rotating order) on the same input, and the result is the median over rounds of each model's time and
of the per-round ratios. Sessions use ``intra_op_num_threads`` threads and full graph optimization.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np


def session(path: str | os.PathLike, threads: int = 1, optimized_path: str | os.PathLike | None = None):
    """A CPU session with every graph optimization on (as users run it); ``optimized_path``: also write the
    optimized graph there (to check which kernels onnxruntime chose)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the NCHWc note on saving an optimized graph is expected
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def compare_latency(paths: dict[str, str | os.PathLike], input_shape: tuple[int, ...], batch_sizes=(1, 32),
                    rounds: int = 15, warmup: int = 2, threads: int = 1, seed: int = 0,
                    min_round_s: float = 0.05) -> dict:
    """Median milliseconds per image of each model, and ``speedup[name] = t(first model) / t(name)`` (median of
    the per-round ratios), for each batch size.

    ``input_shape`` is ``(C, H, W)``. One round = each model run ``reps`` times on the same batch (``reps`` chosen
    once so that a round of the slowest model lasts about ``min_round_s``). Returns
    ``{"threads", "rounds", "batch": {bs: {"ms_per_image": {name: ms}, "speedup": {name: x}, "spread", "reps",
    "cpu_ms_per_image", "cpu_speedup", "cpu_spread"}}}``: wall-clock latency, and the process CPU time of the same
    runs. With one thread the CPU time is the latency the model would have on an idle core; on a loaded machine
    (other processes taking the core) it is the steadier of the two.
    """
    sessions = {k: session(p, threads) for k, p in paths.items()}
    names = list(paths)
    rng = np.random.default_rng(seed)
    out = {"threads": threads, "rounds": rounds, "batch": {}}
    for bs in batch_sizes:
        x = rng.standard_normal((bs, *input_shape)).astype(np.float32)
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}

        def run(k: str, reps: int, feeds: dict = feeds) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                sessions[k].run(None, feeds[k])
            return (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps

        for _ in range(warmup):
            for k in names:
                run(k, 1)
        slowest = max(run(k, 1)[1] for k in names)
        reps = max(1, int(min_round_s / max(slowest, 1e-6)))
        wall: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate: no model always goes first
            for k in order:
                w, c = run(k, reps)
                wall[k].append(w)
                cpu[k].append(c)
        out["batch"][bs] = {"reps": reps, **_summary(wall, bs, names[0]),
                            **{f"cpu_{k}": v for k, v in _summary(cpu, bs, names[0]).items()}}
    return out


def _summary(times: dict[str, list[float]], bs: int, ref: str) -> dict:
    return {"ms_per_image": {k: 1e3 * statistics.median(v) / bs for k, v in times.items()},
            "speedup": {k: statistics.median(a / b for a, b in zip(times[ref], v)) for k, v in times.items()},
            "spread": {k: [1e3 * min(v) / bs, 1e3 * max(v) / bs] for k, v in times.items()}}

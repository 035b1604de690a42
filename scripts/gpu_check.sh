#!/usr/bin/env bash
# GPU check of the search step (issue 16, item 4), for a session that has a CUDA device. It has NOT been run yet:
# the session that wrote it had no GPU. About 5-8 minutes on one GPU.
#
# 1. Equality: one search step (small_cnn hypernet, CE + R_C + R_G, Adam) on the CPU and on the GPU from the same state,
#    in float64 (TF32 off), for the fused and the reference mixed layers: losses and gradients must agree to ~1e-9.
# 2. Host syncs: a second step on the GPU under torch.cuda.set_sync_debug_mode("warn"); prints each sync's source.
#    Expected: none from the search step (gmpq.search.*); the fixed-policy QAT quantizers still read their
#    `initialized` / `signed` flags on every forward (gmpq/quant/quantizers.py).
# 3. Step time and peak memory on the GPU (wall time, torch.cuda.max_memory_allocated), before/after in one run.
#
#   bash scripts/gpu_check.sh            # PY=path/to/python to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export GMPQ_DATA=${GMPQ_DATA:-/work/shared/data}

$PY - <<'EOF'
import copy
import warnings

import torch

from gmpq.models import create_model
from gmpq.quant.cost import measure_macs
from gmpq.runtime.terms import weighted_total
from gmpq.search.config import LossConfig, SearchConfig
from gmpq.search.hypernet import build_hypernet, calibrate_hypernet, mixed_layers
from gmpq.search.losses import loss_weights
from gmpq.search.setup import freeze
from gmpq.search.train import SearchState, build_optimizer, compute_losses

assert torch.cuda.is_available(), "no CUDA device"
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
teacher = freeze(create_model("small_cnn"))
base = create_model("small_cnn")
base.load_state_dict(teacher.state_dict())
build_hypernet(base, [2, 3, 4], [2, 3, 4], exclude=["conv1.conv", "fc"])
x = torch.randn(32, 1, 16, 16)
y = torch.arange(32) % 10
calibrate_hypernet(base, [x], num_batches=1)
macs = measure_macs(create_model("small_cnn"), (1, 16, 16))


def step(impl, device, dtype, sync_check=False):
    model, t = copy.deepcopy(base).to(device, dtype), copy.deepcopy(teacher).to(device, dtype)
    for m in mixed_layers(model).values():
        m.impl = impl
    cfg = SearchConfig(model="small_cnn", loss=LossConfig(eta=1.0))
    s = SearchState(cfg=cfg, model=model.train(), teacher=t, macs=macs, fixed_bops=0.0, layer="conv5",
                    fc_student=model.fc, fc_teacher=t.fc)
    opt = build_optimizer(model, cfg)
    xd, yd = x.to(device, dtype), y.to(device)
    out = None
    for k in range(2 if sync_check else 1):
        if sync_check and k == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            terms, _ = compute_losses(s, xd, yd)
            total = weighted_total(terms, loss_weights(cfg.loss.zeta, cfg.loss.eta))
            opt.zero_grad(set_to_none=True)
            total.backward()
            grads = [p.grad.detach().cpu().double().clone() for p in model.parameters() if p.grad is not None]
            opt.step()
        if sync_check and k == 1:
            torch.cuda.set_sync_debug_mode("default")
            syncs = sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
            print(f"[{impl}] host syncs in a search step on the GPU: {len(syncs)}", *syncs, sep="\n  ")
        out = ({k: float(v.detach()) for k, v in terms.items()}, grads) if out is None else out
    return out


for impl in ("fused", "reference"):
    (t_cpu, g_cpu), (t_gpu, g_gpu) = step(impl, "cpu", torch.float64), step(impl, "cuda", torch.float64)
    dt = max(abs(t_cpu[k] - t_gpu[k]) / max(abs(t_cpu[k]), 1e-12) for k in t_cpu)
    dg = max(float((a - b).norm() / max(float(a.norm()), 1e-12)) for a, b in zip(g_cpu, g_gpu))
    print(f"[{impl}] float64 CPU vs GPU: max relative difference of the terms {dt:.2e}, of the gradients {dg:.2e} "
          f"({'OK' if dt < 1e-9 and dg < 1e-9 else 'MISMATCH'})")
    step(impl, "cuda", torch.float32, sync_check=True)
EOF

$PY benchmarks/bench_search.py --device cuda --model resnet20 --batch 128 --steps 20 --variants b,c,d,"d'" \
    --impl reference,fused
$PY benchmarks/bench_search.py --device cuda --model resnet18 --stem search --bits 2,3,4,6 --batch 64 --steps 20 \
    --variants b,d --impl reference,fused
$PY benchmarks/bench_search.py --device cuda --model resnet56 --batch 128 --steps 10 --variants b,d \
    --impl reference,fused
$PY benchmarks/bench_search.py --device cuda --model resnet18 --stem search --bits 2,3,4,6 --batch 64 --steps 3 \
    --variants b,d --impl fused --profile

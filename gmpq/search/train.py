"""The GMPQ search: ``run_search(cfg) -> metrics``.

1. data, teacher (pretrained float model, frozen; or a float model trained for ``pretrain_epochs`` in this run),
2. hypernet (warm start from the teacher's weights, mixed layers, PACT calibration),
3. the epoch loop: CE + zeta R_C + eta R_G, Adam with x0.1 steps at 50 % / 75 % of the epochs,
4. after every epoch (atomically): ``checkpoint.pt``, ``policy.json``, ``policy_bits.png``, ``log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn

from gmpq.config import save_config
from gmpq.data import build_loaders
from gmpq.errors import NonFiniteLossError
from gmpq.io import ensure_writable_dir
from gmpq.quant.policy import save_policy
from gmpq.runtime import RunLog, load_checkpoint, save_checkpoint
from gmpq.search import losses as L
from gmpq.search.config import SearchConfig
from gmpq.search.export import build_policy, save_bits_chart
from gmpq.search.gradcam import capture_features, student_attribution, teacher_attribution
from gmpq.search.hypernet import expected_bits, is_arch_param, mixed_layers
from gmpq.search.runtime import (
    Dist,
    allreduce_grads,
    allreduce_sum,
    broadcast_state,
    inputs_to,
)


@dataclasses.dataclass
class SearchState:
    """Everything one training step needs besides the batch."""

    cfg: SearchConfig
    model: nn.Module
    teacher: nn.Module | None
    macs: dict[str, int]
    fixed_bops: float
    layer: str  # attribution layer
    fc_student: nn.Linear | None  # set when the closed-form CAM applies
    fc_teacher: nn.Linear | None


def compute_losses(s: SearchState, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
    """Named loss terms (unweighted) and extra scalars (p, expected BOPs) for one batch."""
    lc = s.cfg.loss
    with capture_features(s.model, s.layer) as store:
        logits = s.model(x)
    ebits = expected_bits(s.model)
    target_bops = lc.target_gbops * 1e9 if lc.target_gbops else None
    terms = {"ce": L.cross_entropy(logits, y),
             "complexity": L.complexity_loss(ebits, s.macs, lc.complexity_mode, target_bops, s.fixed_bops)}
    p = L.capacity_p(ebits, lc.qw0, lc.qa0) if lc.capacity == "aware" else torch.tensor(lc.fixed_p)
    if lc.eta > 0:
        fc_t = s.fc_teacher.weight if s.fc_teacher is not None else None
        t_map, target, _ = teacher_attribution(s.teacher, x, y, s.layer, lc.attribution_class, fc_t)
        fc_s = s.fc_student.weight if s.fc_student is not None else None
        s_map = student_attribution(store["features"], logits, target, tuple(x.shape[-2:]), fc_s)
        terms["attribution"] = L.attribution_loss(s_map, t_map, p, lc.topk)
    else:  # EdMIPS: no attribution term, and no teacher forward
        terms["attribution"] = torch.zeros((), device=x.device)
    extra = {"p": float(p), "expected_bops_g": (float(L.expected_bops(ebits, s.macs).detach()) + s.fixed_bops) / 1e9,
             "correct": int((logits.argmax(1) == y).sum())}
    return terms, extra


def train_one_epoch(s: SearchState, loader, optimizer, d: Dist, epoch: int, writer, ckpt: Path) -> dict:
    """One pass over ``loader``; returns mean loss terms, p, expected BOPs and train accuracy."""
    cfg, weights = s.cfg, L.loss_weights(s.cfg.loss.zeta, s.cfg.loss.eta)
    params = [p for p in s.model.parameters() if p.requires_grad]
    s.model.train()
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)
    n_steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    bar = _progress(cfg, d, n_steps, epoch)
    sums: dict[str, float] = {}
    seen = 0
    for step, batch in enumerate(loader):
        if step >= n_steps:
            break
        x, y = inputs_to(batch, d.device)
        terms, extra = compute_losses(s, x, y)
        total = L.weighted_total(terms, weights)
        for name, value in {**terms, "total": total}.items():  # a CPU-GPU sync per step: cheap next to R_G
            if not math.isfinite(value.item()):
                raise NonFiniteLossError(f"loss term {name!r} is {value.item()} at epoch {epoch + 1}, step {step + 1};"
                                         f" the search stopped and the last good checkpoint {str(ckpt)!r} was kept")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        allreduce_grads(params, d)
        optimizer.step()
        n = x.shape[0]
        seen += n
        for k, v in {**{k: t.item() for k, t in terms.items()}, "total": total.item(), "p": extra["p"],
                     "expected_bops_g": extra["expected_bops_g"]}.items():
            sums[k] = sums.get(k, 0.0) + v * n
        sums["correct"] = sums.get("correct", 0.0) + extra["correct"]
        if writer is not None:
            gstep = epoch * n_steps + step
            for k in ("ce", "complexity", "attribution", "p", "expected_bops_g"):
                writer.add_scalar(f"train/{k}", terms[k].item() if k in terms else extra[k], gstep)
            writer.add_scalar("train/total", total.item(), gstep)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ce=f"{terms['ce'].item():.3f}", gbops=f"{extra['expected_bops_g']:.4f}")
    if bar is not None:
        bar.close()
    keys = sorted(sums)
    totals = allreduce_sum([sums[k] for k in keys] + [float(seen)], d)
    seen_all = max(totals[-1], 1.0)
    out = {k: v / seen_all for k, v in zip(keys, totals[:-1])}
    out["train_acc"] = out.pop("correct")
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, d: Dist) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``loader``, summed over ranks."""
    model.eval()
    correct = total = 0
    for batch in loader:
        x, y = inputs_to(batch, d.device)
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    c, t = allreduce_sum([float(correct), float(total)], d)
    return c / max(t, 1.0)


def _progress(cfg: SearchConfig, d: Dist, total: int, epoch: int):
    if not (cfg.progress and d.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"search epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)


def build_optimizer(model: nn.Module, cfg: SearchConfig) -> tuple[torch.optim.Optimizer, object]:
    """Two parameter groups: network (weight decay) and importance logits (no weight decay, own lr)."""
    oc = cfg.optim
    net = [p for n, p in model.named_parameters() if p.requires_grad and not is_arch_param(n)]
    arch = [p for n, p in model.named_parameters() if p.requires_grad and is_arch_param(n)]
    groups = [{"params": net, "lr": oc.lr, "weight_decay": oc.weight_decay, "name": "weights"},
              {"params": arch, "lr": oc.arch_lr, "weight_decay": 0.0, "name": "importance"}]
    if oc.optimizer == "adam":
        opt = torch.optim.Adam(groups)
    else:
        opt = torch.optim.SGD(groups, momentum=oc.momentum)
    milestones = sorted({max(1, round(f * cfg.epochs)) for f in oc.milestones})
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=oc.gamma)


def run_search(cfg: SearchConfig, resume: bool = False) -> dict:
    """Run the search described by ``cfg``; outputs go to ``cfg.out_dir``. Returns the last epoch's metrics."""
    from gmpq.search.setup import prepare  # the setup (models, teacher, hypernet) is long; kept apart

    d = Dist(cfg.device)
    try:
        out = Path(cfg.out_dir)
        if d.is_main:
            ensure_writable_dir(out)
            save_config(cfg, out / "config.yaml")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        ckpt_path = out / "checkpoint.pt"
        state = load_checkpoint(ckpt_path) if resume else None
        train_loader, test_loader = build_loaders(cfg.data, distributed=d.world > 1)
        s, ref, spec = prepare(cfg, d, train_loader, state)
        optimizer, scheduler = build_optimizer(s.model, cfg)
        start = 0
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = state["epoch"]
        broadcast_state(s.model, d)
        log = RunLog(out, enabled=d.is_main, resume=resume)
        log.truncate(start + 1)  # epochs are numbered from 1 in the search log
        writer = log.tb
        metrics: dict = {"epoch": start}
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            metrics = train_one_epoch(s, train_loader, optimizer, d, epoch, writer, ckpt_path)
            scheduler.step()
            metrics.update(epoch=epoch + 1, test_acc=evaluate(s.model, test_loader, d), seconds=time.time() - t0)
            if d.is_main:
                policy = build_policy(s.model, ref, cfg.model, s.macs, spec.input_size, cfg.method, epoch + 1,
                                      zeta=cfg.loss.zeta, eta=cfg.loss.eta, epochs=cfg.epochs,
                                      dataset=cfg.data.name, w_candidates=list(cfg.hypernet.w_bits),
                                      a_candidates=list(cfg.hypernet.a_bits))
                metrics.update(bops_g=policy["summary"]["bops_g"], size_mb=policy["summary"]["size_mb"],
                               avg_w_bits=policy["summary"]["avg_w_bits"])
                save_checkpoint(ckpt_path, epoch=epoch + 1, model=s.model.state_dict(),
                                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                teacher=ref.state_dict() if cfg.weights is None else None,  # trained in-run
                                config=dataclasses.asdict(cfg))
                save_policy(policy, out / "policy.json")
                save_bits_chart(policy, out / "policy_bits.png")
                log.epoch(metrics)
                _log_epoch(writer, s.model, metrics, epoch + 1)
                print(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
        log.close()
        return metrics
    finally:
        d.close()


@torch.no_grad()
def _log_epoch(writer, model: nn.Module, metrics: dict, epoch: int) -> None:
    for k, v in metrics.items():
        if isinstance(v, float):
            writer.add_scalar(f"epoch/{k}", v, epoch)
    for name, m in mixed_layers(model).items():
        writer.add_scalar(f"bits_w/{name}", float(m.expected_w_bits()), epoch)
        writer.add_scalar(f"bits_a/{name}", float(m.expected_a_bits()), epoch)
    writer.flush()


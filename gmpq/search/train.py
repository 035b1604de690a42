"""The GMPQ search: ``run_search(cfg) -> metrics``.

1. data, teacher (pretrained float model, frozen; or a float model trained for ``pretrain_epochs`` in this run, as
   its own engine run in ``<out_dir>/teacher``),
2. hypernet (warm start from the teacher's weights, mixed layers, PACT calibration),
3. ``gmpq.runtime.fit``: CE + zeta R_C + eta R_G, Adam, lr x gamma at the milestones; the gradients are all-reduced by
   hand (the student Grad-CAM differentiates with ``create_graph=True``, which DDP cannot wrap); the gradient norm
   each weighted term sends to the importance logits is logged as ``grad_<term>``,
4. after every epoch, derived from ``checkpoint.pt``: ``policy.json``, ``policy_bits.png``, ``log.jsonl``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function

from gmpq.config import save_config
from gmpq.data import build_loaders, check_dataset_for_model
from gmpq.deploy.evaluate import evaluate
from gmpq.deploy.finetune import calibration_loader
from gmpq.io import ensure_writable_dir
from gmpq.models import model_spec
from gmpq.quant.policy import save_policy
from gmpq.runtime import (
    CHECKPOINT,
    Task,
    broadcast_state,
    fit,
    init_distributed,
    load_resume,
    set_seed,
    shutdown_distributed,
)
from gmpq.runtime.modes import train_mode
from gmpq.search import losses as L
from gmpq.search.config import SearchConfig
from gmpq.search.export import build_policy, final_policy, save_bits_chart
from gmpq.search.gradcam import capture_features, student_attribution, teacher_attribution
from gmpq.search.hypernet import arch_parameters, expected_bits, is_arch_param

PROBE_EVERY = 25  # steps between two measurements of the per-term gradient norms (3 extra backward passes each)


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
    """Named loss terms (unweighted) and extra scalars (p, expected GBOPs, correct predictions) for one batch.

    Every value is a 0-dim tensor: nothing here reads a value back to the host (on a GPU each read is a sync). The
    ``record_function`` scopes name the parts of the step in a profile (``benchmarks/bench_search.py --profile``).
    """
    lc = s.cfg.loss
    with record_function("student_forward"), capture_features(s.model, s.layer) as store:
        logits = s.model(x)
    ebits = expected_bits(s.model)
    target_bops = lc.target_gbops * 1e9 if lc.target_gbops else None
    terms = {"ce": L.cross_entropy(logits, y),
             "complexity": L.complexity_loss(ebits, s.macs, lc.complexity_mode, target_bops, s.fixed_bops)}
    p = L.capacity_p(ebits, lc.qw0, lc.qa0) if lc.capacity == "aware" else torch.tensor(lc.fixed_p)
    if lc.eta > 0:
        fc_t = s.fc_teacher.weight if s.fc_teacher is not None else None
        with record_function("teacher"):
            t_map, target, _ = teacher_attribution(s.teacher, x, y, s.layer, lc.attribution_class, fc_t)
        fc_s = s.fc_student.weight if s.fc_student is not None else None
        with record_function("attribution"):
            s_map = student_attribution(store["features"], logits, target, tuple(x.shape[-2:]), fc_s)
            terms["attribution"] = L.attribution_loss(s_map, t_map, p, lc.topk)
    else:  # EdMIPS: no attribution term, and no teacher forward
        terms["attribution"] = torch.zeros((), device=x.device)
    with torch.no_grad():
        bops_g = (L.expected_bops(ebits, s.macs).double() + s.fixed_bops) / 1e9
        extra = {"p": p.detach(), "expected_bops_g": bops_g.float(), "correct": (logits.argmax(1) == y).sum()}
    return terms, extra


def step_terms(s: SearchState, batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The engine's step: the weighted terms (ce, complexity, attribution) and, logged only, p, the expected GBOPs
    and the batch accuracy."""
    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    terms, extra = compute_losses(s, x, y)
    return terms | {"p": extra["p"], "expected_bops_g": extra["expected_bops_g"],
                    "acc": (extra["correct"].double() / len(y)).float()}


def build_optimizer(model: nn.Module, cfg: SearchConfig) -> torch.optim.Optimizer:
    """Two parameter groups: network (weight decay) and importance logits (no weight decay, own lr)."""
    oc = cfg.optim
    net = [p for n, p in model.named_parameters() if p.requires_grad and not is_arch_param(n)]
    arch = [p for n, p in model.named_parameters() if p.requires_grad and is_arch_param(n)]
    groups = [{"params": net, "lr": oc.lr, "weight_decay": oc.weight_decay, "name": "weights"},
              {"params": arch, "lr": oc.arch_lr, "weight_decay": 0.0, "name": "importance"}]
    if oc.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=oc.momentum)


def run_search(cfg: SearchConfig, resume: bool = False) -> dict:
    """Run the search described by ``cfg``; outputs go to ``cfg.out_dir``. Returns the last epoch's log record."""
    from gmpq.search.setup import prepare  # the setup (models, teacher, hypernet) is long; kept apart

    info = init_distributed(cfg.device)
    try:
        out = Path(cfg.out_dir)
        if info.is_main:
            ensure_writable_dir(out)
            save_config(cfg, out / "config.yaml")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        set_seed(cfg.seed)
        # --resume of a run killed while its teacher was pretraining: no search checkpoint yet, continue the teacher
        teacher_only = resume and not (out / CHECKPOINT).exists() and (out / "teacher" / CHECKPOINT).exists()
        state = load_resume(out, info.device) if resume and not teacher_only else None
        train_loader, test_loader = build_loaders(cfg.data, distributed=info.distributed)
        for split, loader in (("train", train_loader), ("test", test_loader)):  # before any step: a clear error
            check_dataset_for_model(loader.dataset, model_spec(cfg.model), cfg.num_classes,
                                    f"data {cfg.data.name!r} ({split} split)")
        s, ref, spec = prepare(cfg, info, train_loader, state, test_loader=test_loader, resume=resume,
                               calib_loader=calibration_loader(cfg.data, info, train_loader))
        broadcast_state(s.model, info)

        def policy(epoch: int) -> dict:
            return build_policy(s.model, ref, cfg.model, s.macs, spec.input_size, cfg.method, epoch,
                                zeta=cfg.loss.zeta, eta=cfg.loss.eta, epochs=cfg.epochs, dataset=cfg.data.name,
                                w_candidates=list(cfg.hypernet.w_bits), a_candidates=list(cfg.hypernet.a_bits))

        def evaluate_epoch() -> dict:
            metrics = {"test_acc": evaluate(s.model, test_loader, info.device, info, progress=cfg.progress)["top1"]}
            if info.is_main:  # the cost of the policy this epoch would export
                summary = policy(0)["summary"]
                metrics |= {k: summary[k] for k in ("bops_g", "size_mb", "avg_w_bits")}
            return metrics

        def write_outputs(epoch: int, metrics: dict) -> None:
            # the last epoch of a target-mode search exports the budget-exact policy (ILP), others the argmax
            p = final_policy(policy(epoch), cfg, ref, spec.input_size, epoch)
            save_policy(p, out / "policy.json")
            save_bits_chart(p, out / "policy_bits.png")

        task = Task(model=s.model, optimizer=build_optimizer(s.model, cfg), loader=train_loader,
                    loss_terms=lambda net, batch: step_terms(s, batch, info.device),
                    weights=L.loss_weights(cfg.loss.zeta, cfg.loss.eta), evaluate=evaluate_epoch, name="search",
                    on_epoch_start=lambda epoch: train_mode(s.model, cfg.frozen_bn),
                    write_outputs=write_outputs, grad_sync="allreduce",
                    probe=arch_parameters(s.model), probe_every=PROBE_EVERY)
        result = fit(task, cfg, info, state)
        return dict(result.history[-1]) if result.history else {"epoch": result.epoch, **result.metrics}
    finally:
        shutdown_distributed(info)

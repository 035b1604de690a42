"""The one training loop of the project: ``fit(task, cfg, info, state) -> Fit``.

A stage supplies a ``Task``: its model, optimizer, training loader, its step (``loss_terms(net, batch)`` -> dict of
named, unweighted loss terms), the loss weights, its evaluation and its derived outputs. The engine owns the rest:

    for each epoch (with --resume: from the checkpoint's epoch, RNG states and loader generator restored):
        for each step: terms -> total = sum(weights[k] * terms[k])   (the one place where weights are applied)
                       NaN stop naming the term -> backward -> gradient sync -> clip -> optimizer -> lr schedule
        evaluate (every ``eval_every`` epochs and after the last)
        checkpoint.pt: model, optimizer, scheduler, every RNG state, loader generators, the log lines, task extras
        then what is derived from it: log.jsonl, TensorBoard, ``task.write_outputs`` (policy.json, plots, ...)

The checkpoint is the single source of truth: ``--resume`` re-derives log.jsonl and the task's outputs from it
before continuing, so a run killed at any moment resumes to the outputs of the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gmpq.errors import NonFiniteLossError, UserError
from gmpq.runtime.checkpoint import load_checkpoint, save_checkpoint
from gmpq.runtime.distributed import DistInfo, allreduce_grads, any_process, reduce_sum
from gmpq.runtime.progress import Progress
from gmpq.runtime.runlog import RunLog
from gmpq.runtime.settings import RunConfig, lr_factor
from gmpq.runtime.terms import term_grad_norms, weighted_total

CHECKPOINT = "checkpoint.pt"


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return len(first)


@dataclasses.dataclass
class Task:
    """What a stage gives the engine. ``loss_terms`` returns scalar tensors; terms missing from ``weights`` are
    logged only (e.g. DETR's class error). ``probe``: parameters (e.g. the search's importance logits) whose
    gradient norm from each weighted term is measured every ``probe_every`` steps and logged as ``grad_<term>``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Iterable
    loss_terms: Callable[[nn.Module, Any], dict[str, torch.Tensor]]
    weights: dict[str, float]
    evaluate: Callable[[], dict[str, Any]] | None = None  # called on every process
    name: str = "train"
    batch_size: Callable[[Any], int] = _batch_size
    on_epoch_start: Callable[[int], None] | None = None  # train/eval modes, a two-stage switch, ...
    extra_state: Callable[[], dict] = dict  # more stage state for the checkpoint (e.g. metrics before training)
    write_outputs: Callable[[int, dict], None] | None = None  # derived files after an epoch (main process)
    grad_sync: Literal["ddp", "allreduce"] = "ddp"  # allreduce: steps that DDP cannot wrap (create_graph)
    find_unused_parameters: bool = False
    probe: list[torch.Tensor] = dataclasses.field(default_factory=list)
    probe_every: int = 0


@dataclasses.dataclass
class Fit:
    epoch: int  # finished epochs
    metrics: dict  # the last evaluation
    history: list[dict]  # one record per finished epoch, as in log.jsonl
    extra: dict  # the task extras of the checkpoint the run resumed from ({} for a fresh run)


def load_resume(out_dir: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint of ``out_dir`` for ``--resume`` (a ``UserError`` naming the file when there is none, or when it
    was written by an older loop without the RNG states and log lines that resuming needs)."""
    path = Path(out_dir) / CHECKPOINT
    state = load_checkpoint(path, device)
    missing = sorted({"epoch", "model", "optimizer", "scheduler", "rng", "loader_rng", "log", "metrics"} - set(state))
    if missing:
        raise UserError(f"--resume: {str(path)!r} lacks {missing} (written before the training engine); it cannot "
                        "continue the same run: start a new run without --resume")
    return state


def fit(task: Task, cfg: RunConfig, info: DistInfo, state: dict | None = None) -> Fit:
    """Train ``task`` for ``cfg.epochs`` epochs (continuing ``state`` from ``load_resume`` when given)."""
    out = Path(cfg.out_dir)
    steps = len(task.loader) if cfg.max_steps_per_epoch is None else min(len(task.loader), cfg.max_steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(task.optimizer, lr_factor(cfg, steps))
    net = task.model
    if info.distributed and task.grad_sync == "ddp":
        net = nn.parallel.DistributedDataParallel(task.model, find_unused_parameters=task.find_unused_parameters)
    log = RunLog(out, enabled=info.is_main, tensorboard=cfg.tensorboard, lines=state["log"] if state else [])
    epoch, metrics = 0, {}
    if state is not None:
        task.model.load_state_dict(state["model"])
        task.optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        epoch, metrics = state["epoch"], state["metrics"]
        _set_rng(state["rng"], state["loader_rng"], task.loader, info)
        if info.is_main:
            _derive(task, log, epoch, metrics)
            done = "already finished" if epoch >= cfg.epochs else "resumed"
            print(f"{done} at epoch {epoch}: {out / CHECKPOINT}; log.jsonl and the epoch's outputs re-derived "
                  "from it", flush=True)
    while epoch < cfg.epochs:
        t0 = time.time()
        if task.on_epoch_start is not None:
            task.on_epoch_start(epoch)
        train = _train_epoch(task, net, sched, cfg, info, log, epoch, steps)
        epoch += 1
        if task.evaluate is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            metrics = evaluated = task.evaluate()
        else:
            evaluated = {}  # no evaluation this epoch: the log says nothing rather than repeat stale metrics
        record = {"epoch": epoch, **train, **_plain(evaluated), "seconds": round(time.time() - t0, 1)}
        log.lines.append(record)
        ckpt = {"epoch": epoch, "model": task.model.state_dict(), "optimizer": task.optimizer.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_states(info), "loader_rng": _loader_rng(task.loader),
                "log": log.lines, "metrics": metrics, "extra": task.extra_state(),
                "config": dataclasses.asdict(cfg)}
        if info.is_main:
            save_checkpoint(out / CHECKPOINT, **ckpt)
            _derive(task, log, epoch, metrics)
            log.scalars("epoch", {k: v for k, v in record.items() if isinstance(v, (int, float))}, epoch)
            print(f"{task.name} epoch {epoch}/{cfg.epochs}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)), flush=True)
    log.close()
    return Fit(epoch, metrics, list(log.lines), state.get("extra", {}) if state else {})


def _derive(task: Task, log: RunLog, epoch: int, metrics: dict) -> None:
    """Everything derived from the checkpoint of ``epoch``: log.jsonl, then the stage's own files."""
    log.rewrite()
    if task.write_outputs is not None and epoch > 0:
        task.write_outputs(epoch, metrics)


def _train_epoch(task: Task, net: nn.Module, sched, cfg: RunConfig, info: DistInfo, log: RunLog, epoch: int,
                 steps: int) -> dict[str, float]:
    """One pass; returns the sample-weighted means of the terms over all processes, ``lr`` and gradient norms."""
    sampler = getattr(task.loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # a different shard order each epoch under DistributedSampler
    params = [p for p in task.model.parameters() if p.requires_grad]
    sums: dict[str, torch.Tensor] = {}
    grads: dict[str, list[float]] = {}
    seen, lr = 0, task.optimizer.param_groups[0]["lr"]
    bar = Progress(steps, f"{task.name} epoch {epoch + 1}/{cfg.epochs}", cfg.progress and info.is_main, unit="step")
    sync_every = 1 if info.device.type == "cpu" else 50  # a NaN check is a host sync: rare on a GPU
    for step, batch in zip(range(steps), task.loader):  # zip pulls no batch beyond ``steps``
        terms = {k: torch.as_tensor(v) for k, v in task.loss_terms(net, batch).items()}
        total = weighted_total(terms, task.weights)  # the one place where the weights are applied
        gstep = epoch * steps + step
        if step % sync_every == 0 or step + 1 == steps:
            _stop_if_not_finite({**terms, "total": total}, epoch, step, info, Path(cfg.out_dir) / CHECKPOINT)
        if task.probe and task.probe_every and step % task.probe_every == 0:
            for k, g in term_grad_norms(terms, task.weights, task.probe).items():
                grads.setdefault(f"grad_{k}", []).append(g)
        task.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if task.grad_sync == "allreduce":
            allreduce_grads(params, info)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lr = task.optimizer.param_groups[0]["lr"]  # the lr this step used (logged, not the next one)
        task.optimizer.step()
        sched.step()
        n = task.batch_size(batch)
        seen += n
        for k, v in {**terms, "loss": total}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().double() * n
        bar.update(1)
        if step % 20 == 0 or step + 1 == steps:  # .item() syncs: only every 20 steps
            values = {k: float(v.detach()) for k, v in {**terms, "loss": total}.items()}
            log.scalars(task.name, values | {"lr": lr}, gstep)
            bar.set_postfix(loss=values["loss"])
    bar.close()
    keys = sorted(sums)
    totals = reduce_sum(torch.stack([sums[k].to(info.device) for k in keys] +
                                    [torch.tensor(float(seen), dtype=torch.float64, device=info.device)]), info)
    out = {f"train_{k}": float(v) / max(float(totals[-1]), 1.0) for k, v in zip(keys, totals[:-1])}
    return out | {"lr": lr} | {k: sum(v) / len(v) for k, v in grads.items()}


def _stop_if_not_finite(terms: dict[str, torch.Tensor], epoch: int, step: int, info: DistInfo, ckpt: Path) -> None:
    """Every process stops together (a lone rank raising would leave the others waiting in a collective)."""
    bad = [f"{k}={float(v.detach())}" for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
    if any_process(bool(bad), info):
        where = ", ".join(bad) if bad else "a term on another process"
        kept = (f"the last good checkpoint {str(ckpt)!r} is kept" if ckpt.exists()
                else "no checkpoint was written yet")
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}: {where}; the run stopped "
                                 f"and {kept}")


def _plain(metrics: dict) -> dict:
    """The JSON-friendly scalars of ``metrics`` (per-class tables and the like stay out of the log)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def _generators(loader: Iterable) -> list[torch.Generator]:
    """The torch generators that decide the loader's order (DataLoader, its sampler, its batch sampler's sampler)."""
    found = []
    for obj in (loader, getattr(loader, "sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _loader_rng(loader: Iterable) -> list[torch.Tensor]:
    return [g.get_state() for g in _generators(loader)]


def _rng_states(info: DistInfo) -> list[dict]:
    """Python, numpy, torch (and CUDA) RNG states of every process, indexed by rank."""
    mine = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if not info.distributed:
        return [mine]
    states: list = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


def _set_rng(states: list[dict], loader_states: list[torch.Tensor], loader: Iterable, info: DistInfo) -> None:
    mine = states[info.rank] if info.rank < len(states) else states[0]
    random.setstate(mine["python"])
    np.random.set_state(mine["numpy"])
    torch.set_rng_state(mine["torch"].cpu())
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])
    for g, s in zip(_generators(loader), loader_states):
        g.set_state(s.cpu())

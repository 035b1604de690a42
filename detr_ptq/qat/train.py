"""``qat(cfg) -> result``: Q-DETR quantization-aware training of a DETR.

float checkpoint -> (evaluate float) -> quantize (policy / uniform bits) -> calibrate (LSQ+ init; refuses to train
without it) -> evaluate the un-trained quantized model -> AdamW epochs with set loss + lambda x FQM distillation
from the frozen float teacher -> ``final.pth`` (loadable by ``detr-ptq eval``) and ``result.json``.

Outputs in ``out_dir``: ``config.yaml``, ``policy.json`` (the resolved policy), ``checkpoint.pth`` (every epoch,
atomic; ``--resume``), ``final.pth``, ``result.json``, ``log.jsonl``, ``tb/``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from detr_ptq.engine.evaluate import evaluate
from detr_ptq.models.checkpoint import save_detr
from detr_ptq.models.postprocess import PostProcess
from detr_ptq.qat.config import QATConfig
from detr_ptq.qat.losses import CrossAttentionTap, distill_term, total_loss
from detr_ptq.qat.quantize import calibrate_student, init_weight_steps, quantizer_part, set_parts_enabled
from detr_ptq.qat.setup import Data, Models, build_data, build_models, result_header
from gmpq.config import save_config
from gmpq.detection.pycoco import format_metrics
from gmpq.errors import NonFiniteLossError, UserError
from gmpq.io import atomic_write_json, ensure_writable_dir
from gmpq.paths import expand_path
from gmpq.quant import cost_summary, layer_bits
from gmpq.quant.calibrate import require_calibrated
from gmpq.quant.policy import save_policy
from gmpq.runtime import (
    DistInfo,
    RunLog,
    any_process,
    broadcast_state,
    check_finite,
    init_distributed,
    load_checkpoint,
    save_checkpoint,
    set_seed,
    shutdown_distributed,
)

STAGE1_PARTS = ("first_conv", "backbone")


def _optimizer(model: nn.Module, cfg: QATConfig):
    """AdamW; no weight decay on quantizer steps/offsets, alignment parameters, biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 or "quant" in name or "q_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    step = cfg.lr_drop if cfg.lr_drop > 0 else 10**9
    return opt, torch.optim.lr_scheduler.StepLR(opt, step)


def _to(targets: list[dict], device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def _train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:  # keep the float model's BN statistics: batches of 8 quantized activations would drift them
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def enter_stage(m: Models, cfg: QATConfig, epoch: int, data: Data, info: DistInfo, opt, log) -> int:
    """Two-stage QAT: epochs < ``stage1_epochs`` quantize only the backbone; at the switch the remaining weight
    steps are re-initialised and their activation quantizers re-calibrated on the stage-1 weights."""
    if not cfg.two_stage:
        return 2
    if epoch < cfg.stage1_epochs:
        set_parts_enabled(m.student, lambda part: part in STAGE1_PARTS)
        return 1
    set_parts_enabled(m.student, lambda part: True)
    if epoch == cfg.stage1_epochs:
        later = lambda name: quantizer_part(name) not in STAGE1_PARTS  # noqa: E731
        n = init_weight_steps(m.student, cfg.w_init, later)
        names = [n for n, q in m.student.named_modules() if hasattr(q, "observing") and later(n)]
        calibrate_student(m.student, data.calib, cfg.calib_batches, info.device, only=names)
        broadcast_state(m.student, info)  # calibration samples at random: make every process use rank 0's
        for name, p in m.student.named_parameters():  # fresh steps/offsets: drop their stale Adam moments
            if ("quant" in name or "q_norm" in name) and later(name.rsplit(".", 1)[0]):
                opt.state.pop(p, None)
        log(f"stage 2: every part quantized; {n} weight steps re-initialised, {len(names)} quantizers re-calibrated")
    return 2


def qat_settings(cfg: QATConfig) -> dict:
    """The settings that shape the student's state dict (a resumed run must use the same)."""
    return {"align": cfg.align, "query_embed_bits": cfg.query_embed_bits, "per_channel": cfg.per_channel,
            "two_stage": cfg.two_stage, "stage1_epochs": cfg.stage1_epochs if cfg.two_stage else None}


def check_resume_settings(saved: dict, now: dict, ckpt: Path) -> None:
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if diffs:
        raise UserError(f"--resume: {str(ckpt)!r} was trained with other settings ({'; '.join(diffs)}); use the "
                        f"same settings or another out_dir")


def _stop_if_not_finite(terms: dict, step: int, ckpt: Path, info: DistInfo) -> None:
    """Every process stops together (a lone rank raising would leave the others in the gradient all-reduce)."""
    bad = not all(torch.isfinite(v.detach()).all() for v in terms.values())
    if any_process(bad, info):
        check_finite(terms, step, ckpt if ckpt.exists() else None)  # raises, naming the terms, where they are bad
        raise NonFiniteLossError(f"non-finite loss on another process at step {step}; the last good checkpoint "
                                 f"is kept at {str(ckpt)!r}")


def train_epoch(net: nn.Module, m: Models, data: Data, opt, cfg: QATConfig, epoch: int, info: DistInfo, taps,
                runlog: RunLog, ckpt: Path) -> dict[str, float]:
    device, is_main = info.device, info.is_main
    _train_mode(m.student, cfg.freeze_bn)
    if hasattr(data.train.sampler, "set_epoch"):
        data.train.sampler.set_epoch(epoch)
    steps = min(len(data.train), cfg.steps_per_epoch or len(data.train))
    sums: dict[str, float] = {}
    bar = tqdm(data.train, total=steps, desc=f"qat epoch {epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and is_main), mininterval=10)
    for step, (images, mask, targets) in enumerate(bar):
        if step >= steps:
            break
        images, mask, targets = images.to(device), mask.to(device), _to(targets, device)
        for tap in taps:
            tap.start()
        outputs = net(images, mask)
        terms = m.criterion(outputs, targets)
        if m.teacher is not None:
            with torch.no_grad():
                t_out = m.teacher(images, mask)
            for tap in taps:
                tap.active = False
            terms["distill"], stats = distill_term(outputs, t_out, taps[0].features(), taps[1].features(),
                                                   targets, cfg.fqm_tau)
            terms["fqm_selected"] = torch.tensor(stats["fqm_selected"])
        loss = total_loss(terms, m.criterion.weight_dict, cfg.distill_weight)
        _stop_if_not_finite({"total": loss, **terms}, epoch * steps + step, ckpt, info)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(m.student.parameters(), cfg.clip_max_norm)
        opt.step()
        values = {"loss": loss.item(), **{k: float(v.detach()) for k, v in terms.items() if not k[-1].isdigit()}}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if step % 10 == 0:
            runlog.scalars("train", values, epoch * steps + step)
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    return {k: v / max(steps, 1) for k, v in sums.items()}


def _evaluate(model: nn.Module, data: Data, device, is_main: bool) -> dict:
    """COCO metrics on the val split (main process only; the others get {})."""
    if not is_main:
        return {}
    metrics = evaluate(model, PostProcess(), data.val, data.val_gt, device)
    return {k: v for k, v in metrics.items() if v is not None}


def qat(cfg: QATConfig, resume: bool = False, log=print) -> dict:
    """Run the QAT described by ``cfg`` (``resume``: continue from ``out_dir/checkpoint.pth``)."""
    info = init_distributed(cfg.device)
    torch.set_num_threads(cfg.num_threads)
    out = ensure_writable_dir(expand_path(cfg.out_dir))
    set_seed(cfg.seed)  # the same on every process: identical student and calibration
    data = build_data(cfg, info)
    ckpt, policy_path = out / "checkpoint.pth", out / "policy.json"
    if resume and not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint at {str(ckpt)!r}; run without --resume first")
    float_metrics: dict = {}

    def eval_float(model: nn.Module) -> None:
        if cfg.eval_float and not resume:
            float_metrics.update(_evaluate(model, data, info.device, info.is_main))

    m = build_models(cfg, info, policy_path if resume else None, eval_float)
    opt, sched = _optimizer(m.student, cfg)
    runlog = RunLog(out, enabled=info.is_main, tensorboard=cfg.tensorboard, resume=resume)
    start = 0
    if resume:
        state = load_checkpoint(ckpt, info.device)
        check_resume_settings(state.get("qat", {}), qat_settings(cfg), ckpt)
        m.student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, before, float_metrics = state["epoch"], state["before"], state["float"]
        if state.get("loader_rng") is not None and hasattr(data.train.sampler, "generator"):
            data.train.sampler.generator.set_state(state["loader_rng"].cpu())
        runlog.truncate(start)
        log(f"resumed from {ckpt} after epoch {start}")
    elif cfg.calib_batches > 0:
        set_seed(cfg.seed)  # calibration subsamples at random: the same draw whether or not a teacher was built
        calibrate_student(m.student, data.calib, cfg.calib_batches, info.device)
    require_calibrated(m.student)  # QAT never starts from uninitialised LSQ+ steps
    if not resume:
        before = _evaluate(m.student, data, info.device, info.is_main)
        log(f"float: {format_metrics(float_metrics)}" if float_metrics else "float: not evaluated")
        log(f"quantized, before training: {format_metrics(before)}" if before else "")
    if info.is_main:
        save_config(cfg, out / "config.yaml")
        save_policy(m.policy, policy_path)
    net = DistributedDataParallel(m.student, find_unused_parameters=True) if info.distributed else m.student
    taps = (CrossAttentionTap(m.student), CrossAttentionTap(m.teacher)) if m.teacher is not None else ()
    metrics, t_start = before, time.time()
    if start >= cfg.epochs:  # resumed after the last epoch (e.g. stopped while finishing): evaluate again
        metrics = _evaluate(m.student, data, info.device, info.is_main)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        stage = enter_stage(m, cfg, epoch, data, info, opt, log)
        train = train_epoch(net, m, data, opt, cfg, epoch, info, taps, runlog, ckpt)
        sched.step()
        if info.is_main:  # the finished epoch is saved before the (long) evaluation
            rng = data.train.sampler.generator.get_state() if hasattr(data.train.sampler, "generator") else None
            save_checkpoint(ckpt, model=m.student.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), epoch=epoch + 1, before=before, float=float_metrics,
                            loader_rng=rng, qat=qat_settings(cfg))
        metrics = _evaluate(m.student, data, info.device, info.is_main)
        if info.is_main:
            runlog.epoch({"epoch": epoch, "stage": stage, **{f"train_{k}": v for k, v in train.items()},
                          **metrics, "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)})
            runlog.scalars("val", metrics, epoch)
            log(f"epoch {epoch + 1}/{cfg.epochs} (stage {stage}): loss {train.get('loss', 0):.4f}  "
                f"{format_metrics(metrics)}")
    for tap in taps:
        tap.close()
    result = {}
    if info.is_main:
        result = _finish(cfg, m, data, out, metrics, before, float_metrics, time.time() - t_start)
    runlog.close()
    shutdown_distributed(info)
    return result


def _finish(cfg: QATConfig, m: Models, data: Data, out: Path, metrics: dict, before: dict, float_metrics: dict,
            seconds: float) -> dict:
    qat_state = {"policy": m.policy, "query_embed_bits": cfg.query_embed_bits, "align": cfg.align,
                 "per_channel": cfg.per_channel}
    save_detr(out / "final.pth", m.student, m.detr_config, qat=qat_state, metrics=metrics,
              train_config={"min_size": data.min_size, "max_size": data.max_size})
    costs = cost_summary(m.student, layer_bits(m.policy, m.student), (3, data.min_size, data.max_size))
    f50 = float_metrics.get("AP50")
    result = {"name": out.name, **result_header(cfg), "images": len(data.val_gt["images"]),
              "AP": metrics.get("AP"), "AP50": metrics.get("AP50"), "metrics": metrics, "before": before,
              "float": float_metrics, "recovery_AP50": metrics["AP50"] / f50 if f50 else None,
              "train_seconds": round(seconds, 1), "gbops": costs["bops"] / 1e9,
              "float_gbops": costs["float_bops"] / 1e9, "avg_w_bits": costs["avg_w_bits"],
              "avg_a_bits": costs["avg_a_bits"], "checkpoint": str(out / "final.pth"),
              "config": dataclasses.asdict(cfg)}
    atomic_write_json(out / "result.json", result)
    return result

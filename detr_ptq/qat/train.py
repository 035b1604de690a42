"""``qat(cfg) -> result``: Q-DETR quantization-aware training of a DETR.

float checkpoint -> (evaluate float) -> quantize (policy / uniform bits) -> calibrate (LSQ+ init; refuses to train
without it) -> evaluate the un-trained quantized model -> AdamW epochs with set loss + lambda x FQM distillation
from the frozen float teacher, on the project's one training loop (``gmpq.runtime.fit``) -> ``final.pth``
(loadable by ``detr-ptq eval``) and ``result.json``.

Outputs in ``out_dir``: ``config.yaml``, ``policy.json`` (the resolved policy), ``checkpoint.pt`` (every epoch,
atomic; ``--resume``), ``log.jsonl`` (one line per finished epoch, numbered from 1), ``tb/``; after the last epoch
``final.pth`` and ``result.json``. policy.json, final.pth and result.json are derived from the checkpoint: a
``--resume`` of a finished run re-writes them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from detr_ptq.engine.train import coco_evaluator, to_device
from detr_ptq.models.checkpoint import save_detr
from detr_ptq.models.postprocess import PostProcess
from detr_ptq.qat.config import QATConfig
from detr_ptq.qat.losses import CrossAttentionTap, distill_term
from detr_ptq.qat.quantize import calibrate_student, init_weight_steps, quantizer_part, set_parts_enabled
from detr_ptq.qat.setup import Data, Models, build_data, build_models, result_header
from gmpq.config import save_config
from gmpq.detection.pycoco import format_metrics
from gmpq.errors import UserError
from gmpq.io import atomic_write_json, ensure_writable_dir
from gmpq.paths import expand_path
from gmpq.quant import cost_summary, layer_bits
from gmpq.quant.calibrate import require_calibrated
from gmpq.quant.policy import save_policy
from gmpq.runtime import (
    CHECKPOINT,
    DistInfo,
    Task,
    broadcast_state,
    fit,
    init_distributed,
    load_resume,
    set_seed,
    shutdown_distributed,
)
from gmpq.runtime.modes import train_mode

STAGE1_PARTS = ("first_conv", "backbone")


def _optimizer(model: nn.Module, cfg: QATConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on quantizer steps/offsets, alignment parameters, biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 or "quant" in name or "q_norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


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


def _evaluator(model: nn.Module, data: Data, info: DistInfo, cfg: QATConfig):
    """``() -> COCO metrics`` of ``model`` on the val split without the undefined (None) ones; {} off the main
    process."""
    run = coco_evaluator(model, PostProcess(), data.val, data.val_gt, info, cfg.progress)
    return lambda: {k: v for k, v in run().items() if v is not None}


def qat_loss_terms(m: Models, cfg: QATConfig, device: torch.device):
    """The step: batch -> set-loss terms (+ ``distill`` and the logged ``fqm_selected`` with a teacher)."""
    taps = (CrossAttentionTap(m.student), CrossAttentionTap(m.teacher)) if m.teacher is not None else ()

    def loss_terms(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, mask, targets = batch[0].to(device), batch[1].to(device), to_device(batch[2], device)
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
            terms["fqm_selected"] = torch.tensor(float(stats["fqm_selected"]))
        return terms

    return loss_terms, taps


def qat(cfg: QATConfig, resume: bool = False, log=print) -> dict:
    """Run the QAT described by ``cfg`` (``resume``: continue from ``out_dir/checkpoint.pt``)."""
    info = init_distributed(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = ensure_writable_dir(expand_path(cfg.out_dir))
    state = load_resume(out, info.device) if resume else None
    extra = state["extra"] if state is not None else {}
    if state is not None:
        check_resume_settings(extra["qat"], qat_settings(cfg), out / CHECKPOINT)
    set_seed(cfg.seed)  # the same on every process: identical student and calibration
    data = build_data(cfg, info)
    policy_path = out / "policy.json"
    if state is not None:  # the run's resolved policy comes from its checkpoint
        if info.is_main:
            save_policy(extra["policy"], policy_path)
        if info.distributed:
            dist.barrier()
        data.calib.generator.set_state(extra["calib_rng"])  # stage 2 re-calibrates from where the run was
    float_metrics: dict = dict(extra.get("float", {}))

    def eval_float(model: nn.Module) -> None:
        if cfg.eval_float and state is None:
            float_metrics.update(_evaluator(model, data, info, cfg)())

    m = build_models(cfg, info, policy_path if state is not None else None, eval_float)
    evaluate = _evaluator(m.student, data, info, cfg)
    opt = _optimizer(m.student, cfg)
    if state is None:
        if cfg.calib_batches > 0:
            set_seed(cfg.seed)  # calibration subsamples at random: the same draw whether or not a teacher was built
            calibrate_student(m.student, data.calib, cfg.calib_batches, info.device)
        require_calibrated(m.student)  # QAT never starts from uninitialised LSQ+ steps
        before = evaluate()
        log(f"float: {format_metrics(float_metrics)}" if float_metrics else "float: not evaluated")
        log(f"quantized, before training: {format_metrics(before)}" if before else "")
    else:
        before = extra["before"]
    if info.is_main:
        save_config(cfg, out / "config.yaml")
        save_policy(m.policy, policy_path)
    loss_terms, taps = qat_loss_terms(m, cfg, info.device)
    result: dict = {}

    def on_epoch_start(epoch: int) -> None:
        enter_stage(m, cfg, epoch, data, info, opt, log)
        # freeze_bn keeps the float model's BN statistics: batches of 8 quantized activations would drift them
        train_mode(m.student, cfg.freeze_bn)

    def write_outputs(epoch: int, metrics: dict) -> None:
        save_policy(m.policy, policy_path)
        if epoch >= cfg.epochs:
            result.update(_finish(cfg, m, data, out, metrics, before, float_metrics))

    task = Task(model=m.student, optimizer=opt, loader=data.train, loss_terms=loss_terms,
                weights={**m.criterion.weight_dict, "distill": cfg.distill_weight}, evaluate=evaluate, name="qat",
                on_epoch_start=on_epoch_start, write_outputs=write_outputs, find_unused_parameters=True,
                probe=[p for p in m.student.parameters() if p.requires_grad] if cfg.grad_probe_every else [],
                probe_every=cfg.grad_probe_every,
                extra_state=lambda: {"before": before, "float": float_metrics, "qat": qat_settings(cfg),
                                     "policy": m.policy, "calib_rng": data.calib.generator.get_state()})
    fit(task, cfg, info, state)
    for tap in taps:
        tap.close()
    shutdown_distributed(info)
    return result


def _finish(cfg: QATConfig, m: Models, data: Data, out: Path, metrics: dict, before: dict,
            float_metrics: dict) -> dict:
    """final.pth and result.json, from the student as restored from (or saved to) the last checkpoint."""
    qat_state = {"policy": m.policy, "query_embed_bits": cfg.query_embed_bits, "align": cfg.align,
                 "per_channel": cfg.per_channel}
    save_detr(out / "final.pth", m.student, m.detr_config, qat=qat_state, metrics=metrics,
              train_config={"min_size": data.min_size, "max_size": data.max_size})
    costs = cost_summary(m.student, layer_bits(m.policy, m.student), (3, data.min_size, data.max_size))
    seconds = sum(json.loads(line)["seconds"] for line in (out / "log.jsonl").read_text().splitlines())
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

"""``finetune_det(cfg) -> result``: map a classification policy onto a detector's backbone, quantize, calibrate,
fine-tune (quantization-aware), evaluate with VOC mAP and COCO AP.

Outputs in ``cfg.out_dir``: ``config.yaml``, ``policy_detector.json`` (the policy in detector names),
``checkpoint.pt`` (each epoch, atomic; ``--resume``), ``log.jsonl`` and TensorBoard events in ``tb/``; after the last
epoch, derived from the checkpoint: ``model_final.pt`` (state dict + detector policy + config + class names: the input
of ``gmpq evaluate-det``) and ``result.json``. The epochs run on ``gmpq.runtime.fit``.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist
from torch import nn
from torchvision.models.detection import FasterRCNN

from gmpq.config import config_to_dict, save_config
from gmpq.detection.config import DetFinetuneConfig
from gmpq.detection.data import training_targets
from gmpq.detection.datasets import build_datasets, make_loader
from gmpq.detection.detectors import build_detector, cost_input_size, load_detector_weights, source_keys
from gmpq.detection.evaluate import evaluate_detector
from gmpq.detection.mapping import map_policy
from gmpq.errors import UserError
from gmpq.io import atomic_write_json, ensure_writable_dir
from gmpq.quant import apply_policy, calibrate, cost_summary, layer_bits, load_policy, save_policy
from gmpq.runtime import (
    DistInfo,
    Task,
    fit,
    init_distributed,
    load_checkpoint,
    load_resume,
    save_checkpoint,
    set_seed,
    shutdown_distributed,
)


def quantize_detector(model: nn.Module, policy: dict, cfg: DetFinetuneConfig, source: str) -> dict:
    """Map ``policy`` (source-classifier names) onto ``model`` and quantize it in place; returns the mapped policy."""
    det_policy = map_policy(policy, cfg.detector.name, model, cfg.rest_w_bits, cfg.rest_a_bits, source)
    apply_policy(model, det_policy, cfg.w_method, cfg.a_method, cfg.per_channel, source=source,
                 model_name=cfg.detector.name)
    return det_policy


def calibrate_detector(model: nn.Module, loader, num_batches: int, device: torch.device, progress: bool = False
                       ) -> dict:
    """Activation ranges from ``num_batches`` batches of images run through the whole detector (eval mode)."""
    return calibrate(model, (([im.to(device) for im in images],) for images, _ in loader), num_batches,
                     progress=progress)


def backbone_costs(model: nn.Module, det_policy: dict, input_size) -> dict:
    """BOPs/size of the backbone (Faster R-CNN: ResNet + FPN; SSD: VGG + extra layers) per image at ``input_size``;
    ``mapped_*`` counts only the layers that came from the classification policy."""
    bits = {n.removeprefix("backbone."): b for n, b in layer_bits(det_policy, model).items()
            if n.startswith("backbone.")}
    s = cost_summary(model.backbone, bits, input_size)
    mapped = {n.removeprefix("backbone.") for n, e in det_policy["layers"].items() if "source_layer" in e}
    rows = [r for r in s["layers"] if r["name"] in mapped]
    return {"input_size": list(input_size), "backbone_bops_g": s["bops"] / 1e9,
            "backbone_float_bops_g": s["float_bops"] / 1e9, "backbone_macs_g": s["macs"] / 1e9,
            "backbone_size_mb": s["size_bytes"] / 1e6, "backbone_avg_w_bits": s["avg_w_bits"],
            "mapped_bops_g": sum(r["bops"] for r in rows) / 1e9,
            "mapped_float_bops_g": sum(r["macs"] for r in rows) * 32 * 32 / 1e9, "mapped_layers": len(rows)}


def loss_weights(model: nn.Module) -> dict[str, float]:
    """torchvision's detection losses come weighted already: every term has weight 1."""
    if isinstance(model, FasterRCNN):
        return {k: 1.0 for k in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")}
    return {"bbox_regression": 1.0, "classification": 1.0}  # SSD, SSDLite


def source_modules(detector: str) -> frozenset[str]:
    """Names of the detector modules that are images of source-classifier modules (the pretrained backbone)."""
    return frozenset(k.rsplit(".", 1)[0] for k in source_keys(detector))


def _in_source_module(name: str, modules: frozenset[str]) -> bool:
    """Whether parameter ``name`` sits in (or under, as a quantizer's parameter) one of ``modules``."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _optimizer(model: nn.Module, cfg: DetFinetuneConfig) -> torch.optim.Optimizer:
    """SGD with two groups: the layers that come from the source classifier at ``lr_backbone`` (default ``lr``),
    the detector's own layers (SSD extra layers, FPN, RPN, heads: all randomly initialised) at ``lr``. A pretrained
    backbone whose BN is folded into its weights (the ImageNet MobileNetV2) has large gradients relative to its
    weights: at the heads' lr it is destroyed, at its own safe lr the new layers learn too slowly."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    modules = source_modules(cfg.detector.name)
    backbone = [p for n, p in named if _in_source_module(n, modules)]
    rest = [p for n, p in named if not _in_source_module(n, modules)]
    lr_backbone = cfg.lr if cfg.lr_backbone is None else cfg.lr_backbone
    return torch.optim.SGD([{"params": rest, "lr": cfg.lr}, {"params": backbone, "lr": lr_backbone}],
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def finetune_det(cfg: DetFinetuneConfig, resume: bool = False) -> dict:
    """Run the detection fine-tuning described by ``cfg``; returns the dict also written to ``result.json``."""
    if not cfg.policy:
        raise UserError("finetune-det needs a policy: --policy FILE (a policy of the source classifier, e.g. from "
                        "`gmpq search` on resnet18 or vgg16, or `gmpq policy uniform`)")
    info = init_distributed(cfg.device)
    try:
        return _finetune_det(cfg, info, resume)
    finally:
        shutdown_distributed(info)


def _finetune_det(cfg: DetFinetuneConfig, info: DistInfo, resume: bool) -> dict:
    out = ensure_writable_dir(cfg.out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed + info.rank)
    policy = load_policy(cfg.policy)
    train_ds, test_ds = build_datasets(cfg.data)
    if cfg.detector.frozen_bn is None:  # resolve now so model_final.pt rebuilds the same modules
        pretrained = cfg.detector.backbone_weights is not None or cfg.init_detector is not None
        cfg = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, frozen_bn=pretrained))
    model = build_detector(cfg.detector, len(train_ds.class_names) + 1)
    if cfg.init_detector:  # float weights by name; the quantized modules keep the float parameter names
        load_detector_weights(model, cfg.init_detector, train_ds.class_names)
    det_policy = quantize_detector(model, policy, cfg, f"policy file {cfg.policy!r}")
    model.to(info.device)
    train_loader = make_loader(train_ds, cfg.data.batch_size, True, cfg.data.num_workers, info.distributed)
    test_loader = make_loader(test_ds, cfg.data.eval_batch_size, False, cfg.data.num_workers)
    steps = len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    state = load_resume(out, info.device) if resume else None
    if state is None:
        calibrate_detector(model, train_loader, cfg.calib_batches, info.device, cfg.progress and info.is_main)
        before = _evaluate(model, test_ds, test_loader, cfg, info) if cfg.eval_before else {}
    else:
        before = state["extra"]["before"]
    if info.is_main:
        save_config(cfg, out / "config.yaml")
        save_policy(det_policy, out / "policy_detector.json")
    timing = {"seconds": 0.0, "steps": 0, "last": None,
              "seconds_per_iter": (state or {}).get("extra", {}).get("seconds_per_iter")}

    def tick() -> None:
        """Close the running step: from its start to the next step, the evaluation or the checkpoint."""
        if timing["last"] is not None:
            timing["seconds"] += time.perf_counter() - timing["last"]
            timing["steps"] += 1
            timing["last"] = None

    def step(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        tick()
        timing["last"] = time.perf_counter()  # a step: loading, forward, backward, optimizer
        images, targets = batch
        return net([im.to(info.device) for im in images], training_targets(targets, info.device))

    def evaluate() -> dict:
        tick()
        return _evaluate(model, test_ds, test_loader, cfg, info)

    def extra() -> dict:
        tick()
        if timing["steps"]:
            timing["seconds_per_iter"] = timing["seconds"] / timing["steps"]
        return {"before": before, "seconds_per_iter": timing["seconds_per_iter"]}

    def write_final(epoch: int, metrics: dict) -> None:
        if epoch == cfg.epochs:
            save_checkpoint(out / "model_final.pt", model=model.state_dict(), policy=det_policy,
                            config=config_to_dict(cfg), class_names=train_ds.class_names)
            atomic_write_json(out / "result.json", result(metrics))

    def result(metrics: dict) -> dict:
        return {"name": out.name, "detector": cfg.detector.name, "policy": cfg.policy,
                "method": policy["created_by"].get("method"), "data": cfg.data.format, "data_root": cfg.data.root,
                "epochs": cfg.epochs, "steps_per_epoch": steps, **_scalars(metrics),
                **_scalars(before, "before_finetune_"), "per_class": metrics.get("per_class"),
                "seconds_per_iter": timing["seconds_per_iter"], "train_data": train_ds.stats,
                "test_data": test_ds.stats, **backbone_costs(model, det_policy, cost_input_size(cfg.detector))}

    task = Task(model=model, optimizer=_optimizer(model, cfg),
                loader=train_loader, loss_terms=step, weights=loss_weights(model), name="finetune-det",
                evaluate=evaluate, on_epoch_start=lambda epoch: model.train(), extra_state=extra,
                write_outputs=write_final)
    run = fit(task, cfg, info, state)
    if run.epoch == 0 and info.is_main:
        write_final(0, before)
    return result(run.metrics if run.epoch else before)


def _evaluate(model, ds, loader, cfg: DetFinetuneConfig, info: DistInfo) -> dict:
    """Evaluation runs on the main process only (the others wait), on the whole test set."""
    metrics = evaluate_detector(model, ds, loader, info.device, cfg.progress) if info.is_main else {}
    if info.distributed:
        dist.barrier()
    return metrics


def _scalars(metrics: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}


def load_finetuned(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, DetFinetuneConfig, list[str]]:
    """Rebuild the quantized detector of a ``model_final.pt`` written by ``finetune_det``: (model, config, classes)."""
    from gmpq.config import load_config

    state = load_checkpoint(path, device)
    if not {"model", "policy", "config", "class_names"} <= set(state):
        raise UserError(f"checkpoint {path!r} is not a model_final.pt of `gmpq finetune-det` (it needs the keys "
                        f"model, policy, config, class_names; found {sorted(state)})")
    cfg = load_config(DetFinetuneConfig, base=state["config"])
    cfg = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, backbone_weights=None))
    model = build_detector(cfg.detector, len(state["class_names"]) + 1)
    apply_policy(model, state["policy"], cfg.w_method, cfg.a_method, cfg.per_channel, source=f"policy in {path!r}")
    model.load_state_dict(state["model"])
    return model.to(device), cfg, list(state["class_names"])

"""Set up a search: the float model (teacher and cost reference), the hypernet, and what the loss needs.

Costs (MACs, BOPs) are counted on the DEPLOYMENT model at its input size (``ModelSpec.input_size``, e.g. 224 x 224 for
ImageNet models), even when the search itself runs on 32 x 32 CIFAR-10 images as in the paper. On small images an
ImageNet model is searched as its search-time variant (``cfg.stem``, ``gmpq.models.search_variants``): same layer
names, so the policy applies to the deployment model unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gmpq.deploy.evaluate import evaluate
from gmpq.errors import UserError
from gmpq.models import create_model, create_search_model, has_search_variant, load_weights, model_spec
from gmpq.quant.cost import measure_macs
from gmpq.quant.modules import quantizable_layers
from gmpq.runtime import CHECKPOINT, DistInfo, RunConfig, Task, fit, load_resume
from gmpq.runtime.modes import train_mode
from gmpq.search.config import SearchConfig
from gmpq.search.export import fixed_bops
from gmpq.search.gradcam import check_attribution_map
from gmpq.search.hypernet import build_hypernet, calibrate_hypernet, mixed_layers
from gmpq.search.train import SearchState


def search_image_shape(train_loader) -> tuple[int, ...]:
    """``(C, H, W)`` of the search images (from the first batch)."""
    with torch.random.fork_rng(devices=[]):  # a peek must not move the global RNG (a sharded loader seeds from it)
        return tuple(next(iter(train_loader))[0].shape[1:])


def uses_search_variant(cfg: SearchConfig, image_shape: tuple[int, ...]) -> bool:
    """Whether the search builds ``cfg.model``'s small-input variant (``cfg.stem``)."""
    if cfg.stem == "search":
        if not has_search_variant(cfg.model):
            create_search_model(cfg.model)  # raises the UserError listing the models that have one
        return True
    deploy_side = model_spec(cfg.model).input_size[-1]
    return cfg.stem == "auto" and has_search_variant(cfg.model) and image_shape[-1] * 2 <= deploy_side


def build_model(cfg: SearchConfig, variant: bool) -> nn.Module:
    """A float ``cfg.model`` (random init), as its search-time variant when ``variant``."""
    return create_search_model(cfg.model, cfg.num_classes) if variant else create_model(cfg.model, cfg.num_classes)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never changes."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pretrain_teacher(model: nn.Module, cfg: SearchConfig, info: DistInfo, train_loader, test_loader=None,
                     resume: bool = False) -> float | None:
    """Train the float ``model`` (Adam + cross-entropy, ``cfg.pretrain_epochs``) with the training engine, as its own
    run in ``<out_dir>/teacher`` (checkpoint, log.jsonl, ``--resume``); prints and returns its test accuracy."""
    run = RunConfig(out_dir=str(Path(cfg.out_dir) / "teacher"), epochs=cfg.pretrain_epochs, seed=cfg.seed,
                    threads=cfg.threads, device=cfg.device, max_steps_per_epoch=cfg.max_steps_per_epoch,
                    eval_every=cfg.pretrain_epochs, progress=cfg.progress, tensorboard=cfg.tensorboard)
    state = load_resume(run.out_dir, info.device) if resume and (Path(run.out_dir) / CHECKPOINT).exists() else None
    if info.is_main and (state is None or state["epoch"] < run.epochs):
        print(f"pretraining the float {cfg.model} for {cfg.pretrain_epochs} epoch(s) to serve as the teacher and the "
              f"warm start: {run.out_dir}", flush=True)

    def ce(net, batch):
        x, y = batch[0].to(info.device), batch[1].to(info.device)
        logits = net(x)
        return {"ce": nn.functional.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}

    def accuracy() -> dict:
        return {"test_acc": evaluate(model, test_loader, info.device, info, progress=cfg.progress)["top1"]}

    task = Task(model=model, optimizer=torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                                        lr=cfg.pretrain_lr),
                loader=train_loader, loss_terms=ce, weights={"ce": 1.0}, name="teacher",
                evaluate=accuracy if test_loader is not None else None,
                on_epoch_start=lambda epoch: train_mode(model, cfg.frozen_bn))
    acc = fit(task, run, info, state).metrics.get("test_acc")
    if info.is_main and acc is not None:
        print(f"teacher: float {cfg.model} after {cfg.pretrain_epochs} epoch(s): test top-1 {acc:.4f}", flush=True)
    return acc


def _float_model(cfg: SearchConfig, d: DistInfo, train_loader, test_loader, resume: bool, variant: bool
                 ) -> tuple[nn.Module, bool]:
    """The float model with trained weights when there are any (file, or pretrained in this run); and whether."""
    model = build_model(cfg, variant).to(d.device)
    if cfg.weights is not None:
        load_weights(model, cfg.weights, strict=True)
        return model, True
    if cfg.pretrain_epochs > 0:
        if cfg.init_weights is not None:  # (a resumed teacher run then loads its checkpoint over it)
            skipped = load_weights(model, cfg.init_weights, strict=False)
            if d.is_main and any(skipped.values()):
                print(f"init_weights: kept the random init of {skipped['shape_mismatch'] + skipped['missing']}")
        pretrain_teacher(model, cfg, d, train_loader, test_loader, resume)
        return model, True
    return model, False


def prepare(cfg: SearchConfig, d: DistInfo, train_loader, state: dict | None, test_loader=None, resume: bool = False,
            calib_loader=None) -> tuple[SearchState, nn.Module, object]:
    """Build everything the loop needs. ``state`` is the search checkpoint when resuming (then the hypernet is not
    calibrated again: ``fit`` loads its state); ``resume`` also continues (or reloads) the pretrained teacher."""
    spec = model_spec(cfg.model)
    image_shape = search_image_shape(train_loader)
    variant = uses_search_variant(cfg, image_shape)
    layer = cfg.loss.attribution_layer or spec.feature_layer
    if cfg.loss.eta > 0:  # fail before any pretraining: a 1 x 1 map makes R_G a constant
        check_attribution_map(build_model(cfg, variant), layer, image_shape, cfg.model)
    float_model, trained = _float_model(cfg, d, train_loader, test_loader, resume, variant)
    if cfg.loss.eta > 0 and not trained:
        raise UserError("loss.eta > 0 needs a teacher: set weights=<float checkpoint> or pretrain_epochs > 0 "
                        "(or loss.eta=0 for the EdMIPS baseline)")
    model = build_model(cfg, variant).to(d.device)
    if cfg.warm_start and trained:
        model.load_state_dict(float_model.state_dict())
    freeze(float_model)
    all_layers = list(quantizable_layers(float_model))
    # MACs of the deployment model at its input size; a search-time variant stands for the registry's model (e.g.
    # the 1000-class ImageNet network), whose classifier is then counted at its real size
    macs = measure_macs(create_model(cfg.model, None if variant else cfg.num_classes), spec.input_size)
    exclude = [n for n, keep in ((spec.first_layer, not cfg.hypernet.quantize_first),
                                 (spec.classifier, not cfg.hypernet.quantize_classifier)) if keep]
    hc = cfg.hypernet
    build_hypernet(model, hc.w_bits, hc.a_bits, exclude, hc.include_linear)
    model.to(d.device)
    if state is None:
        calibrate_hypernet(model, calib_loader or train_loader, hc.calib_batches, hc.signed_acts, d.device)
    fast = (cfg.loss.cam_fast_path and spec.head == "gap_linear" and layer == spec.feature_layer
            and type(model.get_submodule(spec.classifier)) is nn.Linear)
    teacher = float_model if cfg.loss.eta > 0 else None
    s = SearchState(
        cfg=cfg, model=model, teacher=teacher, macs=macs,
        fixed_bops=fixed_bops(all_layers, list(mixed_layers(model)), macs), layer=layer,
        fc_student=model.get_submodule(spec.classifier) if fast else None,
        fc_teacher=float_model.get_submodule(spec.classifier) if fast and teacher is not None else None,
    )
    return s, float_model, spec

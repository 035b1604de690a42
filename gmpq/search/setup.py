"""Set up a search: the float model (teacher and cost reference), the hypernet, and what the loss needs.

Costs (MACs, BOPs) are counted at the model's deployment input size (``ModelSpec.input_size``, e.g. 224 x 224 for
ImageNet models), even when the search itself runs on 32 x 32 CIFAR-10 images as in the paper.
"""

from __future__ import annotations

from torch import nn

from gmpq.errors import UserError
from gmpq.models import create_model, load_weights, model_spec
from gmpq.quant.cost import measure_macs
from gmpq.quant.modules import quantizable_layers
from gmpq.search.config import SearchConfig
from gmpq.search.export import fixed_bops
from gmpq.search.hypernet import build_hypernet, calibrate_hypernet, mixed_layers
from gmpq.search.runtime import Dist, broadcast_state, freeze, pretrain_float
from gmpq.search.train import SearchState


def _float_model(cfg: SearchConfig, d: Dist, train_loader, state: dict | None) -> tuple[nn.Module, bool]:
    """The float model with trained weights when there are any (file, or pretrained in this run); and whether."""
    model = create_model(cfg.model, cfg.num_classes, weights=cfg.weights).to(d.device)
    if cfg.weights is not None:
        return model, True
    if cfg.pretrain_epochs > 0:
        if cfg.init_weights is not None and state is None:
            skipped = load_weights(model, cfg.init_weights, strict=False)
            if d.is_main and any(skipped.values()):
                print(f"init_weights: kept the random init of {skipped['shape_mismatch'] + skipped['missing']}")
        if state is not None and state.get("teacher") is not None:  # resumed: reuse the teacher trained before
            model.load_state_dict(state["teacher"])
        else:
            broadcast_state(model, d)
            if d.is_main:
                print(f"pretraining the float {cfg.model} for {cfg.pretrain_epochs} epoch(s) to serve as the "
                      "teacher and the warm start", flush=True)
            pretrain_float(model, train_loader, cfg.pretrain_epochs, cfg.pretrain_lr, d, cfg.max_steps_per_epoch)
        return model, True
    return model, False


def prepare(cfg: SearchConfig, d: Dist, train_loader, state: dict | None) -> tuple[SearchState, nn.Module, object]:
    """Build everything the loop needs. ``state`` is a loaded checkpoint when resuming."""
    spec = model_spec(cfg.model)
    float_model, trained = _float_model(cfg, d, train_loader, state)
    if cfg.loss.eta > 0 and not trained:
        raise UserError("loss.eta > 0 needs a teacher: set weights=<float checkpoint> or pretrain_epochs > 0 "
                        "(or loss.eta=0 for the EdMIPS baseline)")
    model = create_model(cfg.model, cfg.num_classes).to(d.device)
    if cfg.warm_start and trained:
        model.load_state_dict(float_model.state_dict())
    freeze(float_model)
    all_layers = list(quantizable_layers(float_model))
    macs = measure_macs(float_model, spec.input_size)
    exclude = [n for n, keep in ((spec.first_layer, not cfg.hypernet.quantize_first),
                                 (spec.classifier, not cfg.hypernet.quantize_classifier)) if keep]
    hc = cfg.hypernet
    build_hypernet(model, hc.w_bits, hc.a_bits, exclude, hc.include_linear)
    model.to(d.device)
    if state is not None:
        model.load_state_dict(state["model"])
    else:
        calibrate_hypernet(model, train_loader, hc.calib_batches, hc.signed_acts, d.device)
    layer = cfg.loss.attribution_layer or spec.feature_layer
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

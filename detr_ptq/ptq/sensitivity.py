"""``sensitivity(model, criterion, batches, cfg) -> traces``: per-layer Hessian traces of three losses.

Metrics (a small registry; an unknown name lists the valid ones):

- ``loss``: DETR's training loss (Hungarian matching + set criterion, weighted as in training) at the float
  weights;
- ``output-float``: the distillation loss of Eq. 5 between a student copy and the float teacher, at the float
  weights (student == teacher: value and gradient are 0, the Hessian is not); its box term is the
  twice-differentiable Smooth-L1 surrogate of ``detr_ptq.ptq.distill`` (``distill.box_loss``), because the L1 of
  Eq. 5 has no second derivative; ``loss_value`` reports Eq. 5 with L1;
- ``output-quant``: the same loss with the student's weights at their 8-bit values ``W_q8`` (Eq. 6 symmetric,
  per tensor, via ``gmpq.quant.functional.symmetric_fake_quant``), teacher float. Layers in ``exclude`` (the
  heads, kept full precision) stay float in the student.

Everything runs in fp32 and eval mode (BatchNorm uses its running statistics, dropout is off). Every quantizable
layer is traced, including those the official recipe freezes (backbone stem and layer1): the weights are traced
through ``requires_grad`` set on them alone.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import detr_ptq.models.qattention  # noqa: F401  (registers the attention with gmpq.quant)
from detr_ptq.ptq.calibset import CalibConfig
from detr_ptq.ptq.diagnose import locate_non_twice_differentiable, raise_not_twice_differentiable
from detr_ptq.ptq.distill import DistillConfig, box_residuals, distill_loss, distill_rows
from detr_ptq.ptq.hutchinson import HutchinsonConfig, hutchinson_traces, traced_weights
from gmpq.errors import UserError
from gmpq.quant.functional import symmetric_fake_quant
from gmpq.quant.modules import quantizable_layers
from gmpq.runtime.terms import weighted_total

METRICS = ("loss", "output-float", "output-quant")
DEFAULT_EXCLUDE = ["class_embed", "bbox_embed.*"]  # the final class and box heads stay full precision


@dataclass
class SensitivityConfig:
    checkpoint: str = "detr_ptq/assets/detr_tiny_digits.pth"
    config: str = ""  # DETR preset; "" = the config stored in the checkpoint
    out_dir: str = "runs/ptq_detr_tiny/sensitivity"
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    ref_bits: int = 8  # W_ref of output-quant
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))  # fnmatch patterns of layer names
    calib: CalibConfig = field(default_factory=CalibConfig)
    hutchinson: HutchinsonConfig = field(default_factory=HutchinsonConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    device: str = "cpu"
    num_threads: int = 1

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"metrics={self.metrics} has unknown name(s) {bad}; accepted: {list(METRICS)}")


def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_reference(model: nn.Module, bits: int, exclude: Sequence[str]) -> None:
    """Set (in place) the weights of every non-excluded quantizable layer to their ``bits``-bit Eq. 6 values."""
    with torch.no_grad():
        for name, layer in quantizable_layers(model).items():
            if is_excluded(name, exclude):
                continue
            ws = list(layer.quantized_weights()) if hasattr(layer, "quantized_weights") else [layer.weight]
            for w in ws:
                w.copy_(symmetric_fake_quant(w, bits, per_channel=False))


def _forward(model: nn.Module, batch) -> dict:
    images, mask, _ = batch
    return model(images, mask)


def metric_loss(name: str, model: nn.Module, criterion: nn.Module, cfg: SensitivityConfig
                ) -> tuple[nn.Module, Callable[..., Tensor]]:
    """-> (the student whose weights are traced, ``loss_fn(batch) -> scalar``). For the ``output-*`` metrics
    ``loss_fn(batch, box_loss="l1", residuals=list)`` gives Eq. 5 as written and appends the box residuals
    ``|b_s - b_t|`` (flattened) to ``residuals``; the ``loss`` metric ignores both."""
    if name not in METRICS:
        raise UserError(f"sensitivity metric {name!r} is unknown; accepted: {list(METRICS)}")
    student = copy.deepcopy(model).float().eval()
    if name == "loss":
        def loss_fn(batch, box_loss: str | None = None, residuals: list | None = None) -> Tensor:
            return weighted_total(criterion(_forward(student, batch), batch[2]), criterion.weight_dict)
        return student, loss_fn
    teacher = copy.deepcopy(model).float().eval()
    if name == "output-quant":
        quantize_reference(student, cfg.ref_bits, cfg.exclude)
    cache: dict[int, dict] = {}

    def teacher_out(batch) -> dict:
        key = id(batch[0])  # the calibration batches are materialized once, so their identity is stable
        if key not in cache:
            with torch.no_grad():
                cache[key] = _forward(teacher, batch)
        return cache[key]

    def distill_fn(batch, box_loss: str | None = None, residuals: list | None = None) -> Tensor:
        out_s, out_t = _forward(student, batch), teacher_out(batch)
        if residuals is not None:
            residuals.append(box_residuals(out_s, out_t).detach())
        return distill_loss(out_s, out_t, cfg.distill, box_loss)
    if cfg.distill.box_loss == "smooth_l1":  # the row form that Hutchinson mode gauss-newton needs
        distill_fn.rows = lambda batch: distill_rows(_forward(student, batch), teacher_out(batch), cfg.distill)
    return student, distill_fn


def check_twice_differentiable(model: nn.Module, batch) -> None:
    """Raise ``UserError`` naming the first module of ``model`` whose backward is not differentiable.

    Some such modules make autograd raise; others (``@once_differentiable`` functions) silently return
    gradients without a graph and the Hessian would lose their terms, so the check is run up front, once.
    """
    found = locate_non_twice_differentiable(model, lambda: _forward(model, batch))
    if found is not None:
        raise UserError(f"the model is not twice differentiable, so its Hessian cannot be estimated: module "
                        f"{found[0]!r} ({found[1]}): {found[2]}. Use modules whose backward is itself "
                        f"differentiable (no @once_differentiable functions or fused kernels without double "
                        f"backward)")


def layer_traces(model: nn.Module, criterion: nn.Module, batches: Sequence, metric: str, cfg: SensitivityConfig,
                 progress: Callable | None = None, check: bool = True) -> dict:
    """Hutchinson traces of ``metric`` for every quantizable layer of ``model`` (see ``hutchinson_traces``),
    plus ``loss_value``: the metric's mean over the calibration batches at the traced point (Eq. 5 with L1 for
    the ``output-*`` metrics), and for those the box residuals at that point against ``distill.box_beta``
    (``box_residual_max``, ``box_residual_share_outside_beta``: the share outside the Huber quadratic zone).
    ``check``: first verify that every module of the model is twice differentiable."""
    if check:
        check_twice_differentiable(model, batches[0])
    student, loss_fn = metric_loss(metric, model, criterion, cfg)
    layers = traced_weights(student, quantizable_layers(student))
    if not layers:
        raise UserError("the model has no quantizable layers (Conv2d, Linear or registered types) to trace")
    residuals: list[Tensor] = []
    with torch.no_grad():
        value = sum(float(loss_fn(b, box_loss="l1", residuals=residuals)) for b in batches) / len(batches)
    extra: dict = {}
    if residuals:
        r = torch.cat(residuals)
        extra = {"box_loss": cfg.distill.box_loss, "box_beta": cfg.distill.box_beta,
                 "box_residual_max": float(r.max()),
                 "box_residual_share_outside_beta": float((r >= cfg.distill.box_beta).double().mean())}
        if cfg.distill.box_loss == "smooth_l1" and extra["box_residual_share_outside_beta"] > 0.01:
            warnings.warn(f"{metric}: {100 * extra['box_residual_share_outside_beta']:.1f}% of the box residuals are "
                          f"outside the Smooth-L1 quadratic zone (box_beta={cfg.distill.box_beta}, largest "
                          f"{extra['box_residual_max']:.3g}): their Hessian terms are indefinite; raise "
                          f"distill.box_beta", stacklevel=2)
    try:
        result = hutchinson_traces(loss_fn, batches, layers, cfg.hutchinson, progress=progress,
                                   rows_fn=getattr(loss_fn, "rows", None))
    except RuntimeError as e:
        if "differentiate" not in str(e) and "derivative" not in str(e) and "double backward" not in str(e):
            raise
        raise_not_twice_differentiable(student, lambda: loss_fn(batches[0]), e, f"{metric!r} loss")
    return {"metric": metric, "loss_value": value, **extra, **result}


def sensitivity(model: nn.Module, criterion: nn.Module, batches: Sequence, cfg: SensitivityConfig,
                progress: Callable | None = None) -> dict:
    """Stage: (model, criterion, calibration batches, cfg) -> ``{"layers": [...], "params": {...},
    "metrics": {metric: layer_traces(...)}}``. Model and criterion are not modified."""
    model = model.eval()
    layers = quantizable_layers(model)
    out = {"layers": list(layers), "excluded": [n for n in layers if is_excluded(n, cfg.exclude)],
           "types": {n: type(m).__name__ for n, m in layers.items()}, "metrics": {}}
    for i, metric in enumerate(cfg.metrics):
        out["metrics"][metric] = layer_traces(model, criterion, batches, metric, cfg, progress, check=i == 0)
    return out

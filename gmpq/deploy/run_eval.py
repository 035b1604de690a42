"""``evaluate_model(cfg) -> result``: accuracy and costs of a float, quantized or packed classifier."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gmpq.data import DataConfig, build_dataset
from gmpq.deploy.datasets import extra_evaluations
from gmpq.deploy.evaluate import evaluate
from gmpq.deploy.finetune import quantized_result
from gmpq.errors import UserError
from gmpq.models import create_model, load_weights, model_spec
from gmpq.quant import apply_policy, calibrate, is_calibrated, layer_specs, load_packed, load_policy
from gmpq.runtime import init_distributed


@dataclasses.dataclass
class EvalConfig:
    model: str = "resnet20"
    num_classes: int | None = None
    weights: str | None = None  # float weights, or a quantized checkpoint (from gmpq finetune)
    packed: str | None = None  # a packed file from gmpq export
    policy: str | None = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    calib_batches: int = 8
    device: str = "auto"
    extra_eval: list[str] = dataclasses.field(default_factory=list)  # more test sets (--data syntax)


def _checkpoint_policy(path: str) -> tuple[bool, dict | None]:
    """(is the checkpoint of a quantized model?, the policy stored in it, if any)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - load_weights reports unreadable files with the proper message
        return False, None
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else {}
    quantized = any(".w_quant." in k or ".a_quant." in k for k in state)
    return quantized, obj.get("policy") if isinstance(obj, dict) else None


def build_eval_model(cfg: EvalConfig) -> torch.nn.Module:
    model = create_model(cfg.model, cfg.num_classes)
    if cfg.packed:
        return load_packed(cfg.packed, model)
    if not Path(cfg.weights or "").is_file():
        raise UserError(f"--weights {cfg.weights!r} does not exist")
    quantized, stored = _checkpoint_policy(cfg.weights)
    policy = load_policy(cfg.policy) if cfg.policy else stored
    if quantized and policy is None:
        raise UserError(f"{cfg.weights!r} holds a quantized model but no policy; pass --policy FILE")
    if not quantized:
        load_weights(model, cfg.weights, strict=True)
    if policy is not None:
        apply_policy(model, policy, source=f"policy {cfg.policy or 'stored in ' + cfg.weights!r}",
                     model_name=cfg.model, **_methods(cfg.weights) if quantized else {})
    if quantized:
        load_weights(model, cfg.weights, strict=True)
    return model


def _methods(path: str) -> dict:
    """Quantizer methods recorded in a fine-tune checkpoint's config (defaults otherwise)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    conf = obj.get("config", {}) if isinstance(obj, dict) else {}
    return {k: conf[k] for k in ("w_method", "a_method", "per_channel") if k in conf}


def evaluate_model(cfg: EvalConfig) -> dict:
    info = init_distributed(cfg.device)
    spec = model_spec(cfg.model)
    model = build_eval_model(cfg).to(info.device)
    calibrated_now = False
    if not is_calibrated(model):
        try:
            calib = build_dataset(cfg.data, "train", train_transform=False)
        except UserError as e:
            raise UserError(f"the model's activation quantizers need calibration, but dataset {cfg.data.name!r} has "
                            f"no training split to calibrate on ({e}); evaluate a fine-tuned checkpoint") from None
        calibrate(model, DataLoader(calib, cfg.data.batch_size, shuffle=True,
                                    generator=torch.Generator().manual_seed(0)), cfg.calib_batches, info.device)
        calibrated_now = True
    test = build_dataset(cfg.data, "test", train_transform=False)
    metrics = evaluate(model, DataLoader(test, cfg.data.eval_batch_size), info.device)
    bits = {n: (s.w_bits, s.a_bits) for n, s in layer_specs(model).items()}
    extra = extra_evaluations(model, cfg.extra_eval, info.device, cfg.data.eval_batch_size)
    return {**extra, "model": cfg.model, "weights": cfg.weights, "packed": cfg.packed, "policy": cfg.policy,
            "data": cfg.data.test_name or cfg.data.name, "top1": metrics["top1"], "top5": metrics["top5"],
            "n_test": metrics["n"], "calibrated_now": calibrated_now, **quantized_result(model, bits, spec.input_size)}

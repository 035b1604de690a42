"""``evaluate_model(cfg) -> result``: accuracy and costs of a float, quantized or packed classifier."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import DataLoader

from gmpq.data import DataConfig, build_dataset, check_dataset_for_model
from gmpq.deploy.datasets import extra_evaluations
from gmpq.deploy.evaluate import evaluate
from gmpq.deploy.finetune import quantized_result
from gmpq.errors import UserError
from gmpq.models import create_model, load_weights, model_spec
from gmpq.models.weights import checkpoint_config, stored_policy
from gmpq.paths import expand_path
from gmpq.quant import apply_policy, is_calibrated, layer_specs, load_packed
from gmpq.quant.policy_agreement import choose_policy, describe
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
    override_policy: bool = False  # apply ``policy`` even where it differs from the checkpoint's stored policy


def _is_quantized_checkpoint(path: str) -> bool:
    """Does the checkpoint hold a quantized model (quantizer state next to the weights)?"""
    from gmpq.models.weights import _torch_load, extract_state_dict

    state = extract_state_dict(_torch_load(expand_path(path)), path)
    return any(".w_quant." in k or ".a_quant." in k for k in state)


def build_eval_model(cfg: EvalConfig) -> tuple[torch.nn.Module, dict | None, str]:
    """-> (model ready to evaluate, the policy applied or None, where that policy came from).

    A checkpoint that stores its policy is evaluated with it; ``cfg.policy`` must agree with it unless
    ``cfg.override_policy`` (then a warning names the differences)."""
    model = create_model(cfg.model, cfg.num_classes)
    if cfg.packed:
        from gmpq.quant.export import read_packed

        header, _ = read_packed(cfg.packed)
        packed = {"model": header.get("model"), "created_by": {"method": "packed"}}  # bits live in the file
        return load_packed(cfg.packed, model), packed, f"stored in {cfg.packed}"
    if not expand_path(cfg.weights or "").is_file():
        raise UserError(f"--weights {cfg.weights!r} does not exist")
    quantized = _is_quantized_checkpoint(cfg.weights)
    policy, source = choose_policy(stored_policy(cfg.weights), cfg.policy, cfg.override_policy, cfg.weights)
    if quantized and policy is None:
        raise UserError(f"{cfg.weights!r} holds a quantized model but no policy; pass --policy FILE")
    if not quantized:
        load_weights(model, cfg.weights, strict=True)
    if policy is not None:
        apply_policy(model, policy, source=f"policy {source}", model_name=cfg.model,
                     **_methods(cfg.weights) if quantized else {})
    if quantized:
        load_weights(model, cfg.weights, strict=True)
    return model, policy, source


def _methods(path: str) -> dict:
    """Quantizer methods recorded in a fine-tune checkpoint's config (defaults otherwise)."""
    conf = checkpoint_config(path)
    return {k: conf[k] for k in ("w_method", "a_method", "per_channel") if k in conf}


def evaluate_model(cfg: EvalConfig) -> dict:
    info = init_distributed(cfg.device)
    spec = model_spec(cfg.model)
    model, policy, policy_source = build_eval_model(cfg)
    model = model.to(info.device)
    source = f"--data {cfg.data.test_name or cfg.data.name!r}"
    test = build_dataset(cfg.data, "test", train_transform=False)
    check_dataset_for_model(test, spec, cfg.num_classes, source)  # before any forward pass: a clear error
    calibrated_now = False
    if not is_calibrated(model):
        from gmpq.deploy.calibration import calibrate_on_data  # shared with gmpq export: the same PTQ model

        calibrate_on_data(model, cfg.data, spec, cfg.num_classes, cfg.calib_batches, info.device)
        calibrated_now = True
    metrics = evaluate(model, DataLoader(test, cfg.data.eval_batch_size), info.device)
    bits = {n: (s.w_bits, s.a_bits) for n, s in layer_specs(model).items()}
    extra = extra_evaluations(model, cfg.extra_eval, info.device, cfg.data.eval_batch_size)
    weights, packed = (str(expand_path(p)) if p else None for p in (cfg.weights, cfg.packed))  # no ${GMPQ_DATA}
    return {**extra, "model": cfg.model, "weights": weights, "packed": packed, "policy": policy_source,
            **describe(policy),
            "data": cfg.data.test_name or cfg.data.name, "top1": metrics["top1"], "top5": metrics["top5"],
            "n_test": metrics["n"], "calibrated_now": calibrated_now, **quantized_result(model, bits, spec.input_size)}

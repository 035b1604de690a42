"""Backend verbs: ``gmpq policy {uniform,validate,show}``, ``gmpq cost`` and ``gmpq export``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gmpq.io import atomic_write_json, atomic_write_text
from gmpq.quant.cost import cost_summary, format_summary
from gmpq.quant.export import export_packed, theoretical_packed_bytes
from gmpq.quant.policy import apply_policy, layer_bits, load_policy, save_policy, uniform_policy


def _model(name: str, num_classes: int | None, weights: str | None = None):
    from gmpq.models import create_model, model_spec  # late import: the registry imports timm/torchvision

    spec = model_spec(name)
    return create_model(name, num_classes=num_classes, weights=weights), spec


def _summary_dict(model, policy: dict, input_size) -> dict:
    s = cost_summary(model, layer_bits(policy, model), input_size)
    return {"bops_g": s["bops"] / 1e9, "macs_m": s["macs"] / 1e6, "size_mb": s["size_bytes"] / 1e6,
            "avg_w_bits": s["avg_w_bits"], "avg_a_bits": s["avg_a_bits"], "compression": s["compression"],
            "input_size": list(input_size)}


def cmd_uniform(args: argparse.Namespace) -> int:
    model, spec = _model(args.model, args.num_classes)
    keep = () if args.quantize_first_last else (spec.first_layer, spec.classifier)
    a_bits = None if args.a_bits in (None, 32) else args.a_bits
    policy = uniform_policy(model, args.model, args.w_bits, a_bits, keep_full_precision=keep)
    policy["summary"] = _summary_dict(model, policy, spec.input_size)
    save_policy(policy, args.out)
    print(f"wrote {args.out}: {args.model} at W{args.w_bits}A{a_bits or 32}, "
          f"{policy['summary']['bops_g']:.4f} GBOPs, {policy['summary']['size_mb']:.4f} MB")
    return 0


def cmd_random(args: argparse.Namespace) -> int:
    from gmpq.quant.random_policy import random_policy

    model, spec = _model(args.model, args.num_classes)
    keep = () if args.quantize_first_last else (spec.first_layer, spec.classifier)
    policy = random_policy(model, args.model, args.bops * 1e9, spec.input_size, args.seed, args.candidates, keep)
    policy["summary"] = _summary_dict(model, policy, spec.input_size) | {"target_bops_g": args.bops}
    save_policy(policy, args.out)
    print(f"wrote {args.out}: random policy for {args.model}, {policy['summary']['bops_g']:.4f} GBOPs "
          f"(target {args.bops}), average weight bits {policy['summary']['avg_w_bits']:.2f}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    model, spec = _model(args.model or policy["model"], args.num_classes)
    bits = layer_bits(policy, model, source=f"policy file {args.policy!r}")
    print(f"{args.policy}: valid for {args.model or policy['model']} ({len(bits)} quantizable layers, "
          f"{sum(1 for w, _ in bits.values() if w < 32)} quantized)")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    model, spec = _model(args.model, args.num_classes)
    input_size = tuple(args.input_size) if args.input_size else spec.input_size
    bits = {}
    if args.policy:
        bits = layer_bits(load_policy(args.policy), model, source=f"policy file {args.policy!r}")
    summary = cost_summary(model, bits, input_size)
    title = f"{args.model} @ {'x'.join(map(str, input_size))}" + (f" with {args.policy}" if args.policy else " (float)")
    text = format_summary(summary, title)
    print(text)
    if args.json:
        atomic_write_json(args.json, summary)
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gmpq.models import load_weights
    from gmpq.quant.calibrate import require_calibrated

    policy = load_policy(args.policy)
    model, spec = _model(args.model, args.num_classes)
    apply_policy(model, policy, args.w_method, args.a_method, source=f"policy file {args.policy!r}",
                 model_name=args.model)
    load_weights(model, args.weights, strict=True)
    require_calibrated(model)
    out = Path(args.out)
    stats = export_packed(model.eval(), policy, out, meta={"weights": str(args.weights)})
    stats["theoretical_bytes"] = theoretical_packed_bytes(model)
    if not args.no_onnx:
        from gmpq.quant.onnx_export import export_onnx, run_onnx

        onnx_path = out.with_suffix(".onnx")
        x = torch.randn(2, *spec.input_size, generator=torch.Generator().manual_seed(0))
        export_onnx(model, x[:1], onnx_path)
        with torch.no_grad():
            stats["onnx"] = str(onnx_path)
            stats["onnx_max_abs_diff"] = float((run_onnx(onnx_path, x) - model(x)).abs().max())
    atomic_write_json(out.with_suffix(out.suffix + ".json"), stats)
    print(json.dumps(stats, indent=2))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registered model name (see `gmpq models`)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")


def register(sub: argparse._SubParsersAction) -> None:
    pol = sub.add_parser("policy", help="make, validate and inspect policy files")
    psub = pol.add_subparsers(dest="policy_verb", metavar="ACTION", required=True)

    p = psub.add_parser("uniform", help="every layer at the same bits (first conv and classifier full precision)")
    _add_model_args(p)
    p.add_argument("--w-bits", type=int, required=True)
    p.add_argument("--a-bits", type=int, default=None, help="activation bits (omit or 32: not quantized)")
    p.add_argument("--quantize-first-last", action="store_true", help="also quantize first conv and classifier")
    p.add_argument("--out", required=True, help="policy JSON to write")
    p.set_defaults(func=cmd_uniform)

    p = psub.add_parser("random", help="random bits per layer at a BOPs budget (a baseline)")
    _add_model_args(p)
    p.add_argument("--bops", type=float, required=True, help="target BOPs per image, in G (1e9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--quantize-first-last", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_random)

    p = psub.add_parser("validate", help="check a policy against a model; every problem in one message")
    p.add_argument("policy")
    p.add_argument("--model", default=None, help="model name (default: the policy's)")
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("cost", help="MACs, BOPs, size and average bits of a model, float or with a policy")
    _add_model_args(p)
    p.add_argument("--policy", default=None)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    p.add_argument("--json", default=None, help="also write the summary as JSON")
    p.add_argument("--markdown", default=None, help="also write the table as markdown")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("export", help="packed integer checkpoint of a quantized (calibrated/fine-tuned) model")
    _add_model_args(p)
    p.add_argument("--weights", required=True, help="state dict of the quantized model (e.g. from gmpq finetune)")
    p.add_argument("--policy", required=True)
    p.add_argument("--w-method", default="symmetric", choices=["symmetric", "lsq"])
    p.add_argument("--a-method", default="pact", choices=["pact", "lsq+"])
    p.add_argument("--out", required=True, help="packed file to write (stats go to OUT.json, ONNX to OUT-stem.onnx)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX (QDQ) export")
    p.set_defaults(func=cmd_export)


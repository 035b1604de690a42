"""Backend verbs: ``gmpq policy {uniform,validate,show}``, ``gmpq cost`` (``gmpq export``: gmpq/deploy)."""

from __future__ import annotations

import argparse

from gmpq.cli import positive_int
from gmpq.io import atomic_write_json, atomic_write_text
from gmpq.quant.cost import cost_summary, format_summary
from gmpq.quant.policy import layer_bits, load_policy, save_policy, uniform_policy


def _model(name: str, num_classes: int | None, weights: str | None = None):
    from gmpq.models import create_model, model_spec  # late import: the registry imports timm/torchvision

    spec = model_spec(name)
    return create_model(name, num_classes=num_classes, weights=weights), spec


def _summary_dict(model, policy: dict, input_size) -> dict:
    s = cost_summary(model, layer_bits(policy, model), input_size)
    return {"bops_g": s["bops"] / 1e9, "quantized_bops_g": s["quantized_bops"] / 1e9,  # whole model / papers'
            "macs_m": s["macs"] / 1e6, "size_mb": s["size_bytes"] / 1e6,
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


def cmd_derive(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gmpq.models import model_spec
    from gmpq.search.export import budget_exact_policy  # late import: the search layer sits above the backend

    src = Path(args.search)
    src = src / "policy.json" if src.is_dir() else src
    policy = load_policy(src)
    model, spec = _model(policy["model"], args.num_classes)
    out = budget_exact_policy(policy, model, model_spec(policy["model"]).input_size, args.gbops, args.size_mb,
                              args.convention, min_fraction=args.min_fraction)
    save_policy(out, args.out)
    s = out["summary"]
    print(f"wrote {args.out}: {policy['model']} within the budget, {s['bops_g']:.4f} GBOPs whole model, "
          f"{s['quantized_bops_g']:.4f} GBOPs quantized layers only, {s['size_mb']:.4f} MB, "
          f"log-probability {s['log_prob']:.3f} (argmax: {policy['summary'].get('bops_g', float('nan')):.4f} GBOPs)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from gmpq.errors import UserError
    from gmpq.io import read_json

    policy = read_json(args.policy, what="policy file")  # schema and name problems are reported together below
    name = args.model or (policy.get("model") if isinstance(policy, dict) else None)
    if not isinstance(name, str):
        load_policy(args.policy)  # no usable model name: report the schema problems alone
        raise UserError(f"policy file {args.policy!r} names no model; pass --model NAME")
    model, spec = _model(name, args.num_classes)
    bits = layer_bits(policy, model, source=f"policy file {args.policy!r}", model_name=args.model)
    print(f"{args.policy}: valid for {name} ({len(bits)} quantizable layers, "
          f"{sum(1 for w, _ in bits.values() if w < 32)} quantized)")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    model, spec = _model(args.model, args.num_classes)
    input_size = tuple(args.input_size) if args.input_size else spec.input_size
    bits = {}
    if args.policy:
        bits = layer_bits(load_policy(args.policy), model, source=f"policy file {args.policy!r}",
                          model_name=args.model)
    summary = cost_summary(model, bits, input_size)
    title = f"{args.model} @ {'x'.join(map(str, input_size))}" + (f" with {args.policy}" if args.policy else " (float)")
    text = format_summary(summary, title)
    print(text)
    if args.json:
        atomic_write_json(args.json, summary)
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from gmpq.models import list_models, model_spec

    print(f"{'model':<18} {'input (C, H, W)':<16} {'classes':>7}  first layer / classifier")
    for name in list_models():
        s = model_spec(name)
        print(f"{name:<18} {'x'.join(map(str, s.input_size)):<16} {s.num_classes:>7}  {s.first_layer} / "
              f"{s.classifier}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registered model name (see `gmpq models`)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models with their input size and classes")
    p.set_defaults(func=cmd_models)

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

    p = psub.add_parser("derive", help="budget-exact policy from a search: most probable bits within a budget (ILP)")
    p.add_argument("--search", required=True, help="search output folder (its policy.json) or a searched policy file")
    p.add_argument("--gbops", type=float, default=None, help="BOPs budget per image, in G (1e9)")
    p.add_argument("--size-mb", type=float, default=None, help="model size budget in MB (1e6 bytes)")
    p.add_argument("--convention", default="whole", choices=["whole", "quantized"],
                   help="BOPs of the whole model (default) or of the quantized layers only (the papers' tables)")
    p.add_argument("--min-fraction", type=float, default=None,
                   help="also use at least this fraction of the BOPs budget (e.g. 0.99: same BOPs for every method)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size of the deployment model")
    p.add_argument("--out", required=True, help="policy JSON to write")
    p.set_defaults(func=cmd_derive)

    p = psub.add_parser("validate", help="check a policy against a model; every problem in one message")
    p.add_argument("policy")
    p.add_argument("--model", default=None, help="model name (default: the policy's)")
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("cost", help="MACs, BOPs, size and average bits of a model, float or with a policy")
    _add_model_args(p)
    p.add_argument("--policy", default=None)
    p.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="input size in pixels (default: the model's)")
    p.add_argument("--json", default=None, help="also write the summary as JSON")
    p.add_argument("--markdown", default=None, help="also write the table as markdown")
    p.set_defaults(func=cmd_cost)



"""Deploy verbs: ``gmpq finetune``, ``gmpq evaluate``, ``gmpq export``, ``gmpq report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gmpq.cli import positive_int
from gmpq.config import load_config
from gmpq.data import DataConfig, list_datasets
from gmpq.deploy.datasets import data_arg
from gmpq.errors import UserError


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set or [])
    for flag, key in (("model", "model"), ("weights", "weights"), ("policy", "policy"), ("out_dir", "out_dir"),
                      ("epochs", "epochs")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    if getattr(args, "data", None):
        d = data_arg(args.data)
        sets += [f"data.name={d['name']}"] + ([f"data.root={d['root']}"] if d["root"] else [])
    if getattr(args, "also", None):
        sets.append(f"extra_eval=[{','.join(repr(a) for a in args.also)}]")  # a YAML flow list of quoted strings
    if getattr(args, "test_data", None):
        d = data_arg(args.test_data)
        sets += [f"data.test_name={d['name']}"] + ([f"data.test_root={d['root']}"] if d["root"] else [])
    return sets


def cmd_finetune(args: argparse.Namespace) -> int:
    from gmpq.deploy.config import FinetuneConfig
    from gmpq.deploy.finetune import finetune

    cfg = load_config(FinetuneConfig, args.recipe, _overrides(args))
    result = finetune(cfg, resume=args.resume)
    print(json.dumps({k: result[k] for k in ("top1", "top5", "top1_before_finetune", "bops_g", "size_mb")}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gmpq.deploy.run_eval import EvalConfig, evaluate_model

    if (args.weights is None) == (args.packed is None):
        raise UserError("evaluate needs exactly one of --weights FILE or --packed FILE")
    data = DataConfig(**data_arg(args.data), augment=False, eval_batch_size=args.batch_size, channels=args.channels)
    cfg = EvalConfig(model=args.model, num_classes=args.num_classes, weights=args.weights, packed=args.packed,
                     policy=args.policy, data=data, calib_batches=args.calib_batches, device=args.device,
                     extra_eval=args.also or [], override_policy=args.override_policy)
    result = evaluate_model(cfg)
    print(json.dumps(result, indent=2))
    if args.out:
        from gmpq.io import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gmpq.deploy.export_model import ExportConfig, export_model, format_report

    cfg = ExportConfig(model=args.model, weights=args.weights, out=args.out, num_classes=args.num_classes,
                       policy=args.policy, override_policy=args.override_policy, calib_data=args.calib_data,
                       calib_batches=args.calib_batches, channels=args.channels, onnx=not args.no_onnx,
                       evaluate=not args.no_eval, latency=not args.no_latency, latency_rounds=args.latency_rounds,
                       threads=args.threads, int_outputs=args.int_outputs)
    report = export_model(cfg)
    print(format_report(report))
    print(f"wrote {args.out} and the report {args.out}.json")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gmpq.deploy.report import report

    out = report(args.results, args.out_dir, extra=args.extra, group=args.group)
    print(out["markdown"])
    print(f"\nwrote {Path(args.out_dir) / 'report.md'}, report.json, report.png")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="apply a policy, calibrate, quantization-aware fine-tuning")
    p.add_argument("--recipe", default=None, help="YAML recipe (FinetuneConfig keys)")
    p.add_argument("--policy", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default=None, help="float weights to start from")
    p.add_argument("--data", default=None, help="dataset: NAME, NAME:ROOT or a path (see gmpq evaluate -h)")
    p.add_argument("--test-data", default=None, help="evaluate on this dataset instead of DATA's test split")
    p.add_argument("--also", action="append", metavar="DATA", help="also evaluate the result on DATA (repeatable)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out-dir", default=None, help="output folder (the setting out_dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, repeatable")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="top-1/top-5 plus BOPs, size and compression")
    p.add_argument("--model", required=True)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--weights", default=None, help="float weights, or a quantized checkpoint (with --policy)")
    p.add_argument("--packed", default=None, help="a packed file from gmpq export")
    p.add_argument("--policy", default=None,
                   help="policy JSON (default: the one stored in the checkpoint; a different one needs "
                        "--override-policy)")
    p.add_argument("--override-policy", action="store_true",
                   help="apply --policy even where it differs from the checkpoint's stored policy (warns)")
    p.add_argument("--data", required=True, help=f"one of {list_datasets()}, NAME:ROOT, or a path")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3],
                   help="image channels: imagefolder converts to grayscale (1) or RGB (3; grayscale replicated)")
    p.add_argument("--also", action="append", metavar="DATA", help="also evaluate on DATA (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--calib-batches", type=positive_int, default=8,
                   help="calibrate uncalibrated activation quantizers on this many training batches")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="write the result JSON here (input of gmpq report)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="packed file + integer ONNX of a quantized model, with a deploy report "
                       "(sizes, top-1, onnxruntime latency vs float)")
    p.add_argument("--model", required=True, help="registered model name (see `gmpq models`)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--weights", required=True,
                   help="float weights (post-training quantization: with --policy and --calib-data) or a "
                        "fine-tuned checkpoint from gmpq finetune (stores its policy; no calibration)")
    p.add_argument("--policy", default=None, help="policy JSON (default: the one stored in --weights; a different "
                   "one needs --override-policy)")
    p.add_argument("--override-policy", action="store_true",
                   help="apply --policy even where it differs from the checkpoint's stored policy (warns)")
    p.add_argument("--calib-data", default=None,
                   help="dataset (--data syntax of gmpq evaluate): its train split calibrates the activation "
                        "quantizers exactly as `gmpq evaluate --policy` does and sets the integer ONNX's "
                        "requantization ranges; its test split gives the report's top-1 (default for a fine-tuned "
                        "checkpoint: the data it was trained on)")
    p.add_argument("--calib-batches", type=positive_int, default=8, help="calibration batches (of 64 images)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3],
                   help="image channels: imagefolder converts to grayscale (1) or RGB (3; grayscale replicated)")
    p.add_argument("--out", required=True, help="packed file to write; the ONNX models go next to it "
                   "(OUT-stem.onnx: QDQ reference, .int.onnx: integer, .float.onnx) and the report to OUT.json")
    p.add_argument("--no-onnx", action="store_true", help="write the packed file only")
    p.add_argument("--no-eval", action="store_true", help="skip the top-1 evaluations")
    p.add_argument("--no-latency", action="store_true", help="skip the onnxruntime latency comparison")
    p.add_argument("--latency-rounds", type=positive_int, default=15,
                   help="interleaved timing rounds (float and integer model alternate; medians are reported)")
    p.add_argument("--threads", type=positive_int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--int-outputs", default="float", choices=["float", "uint8"],
                   help="integer ONNX: a convolution output that feeds a float op (residual Add, pooling head) is "
                        "ConvInteger scaled to float (float: exact) or a QLinearConv requantized to uint8 (uint8)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="table and accuracy-vs-BOPs plot of several result.json files",
                       description="One row per result.json, with the BOPs of the whole model and of the quantized "
                       "layers only, and the Attribution Rank Distance (ARD) to the float model when gmpq "
                       "attribution wrote attribution.json in the run folder or its attribution/ subfolder.")
    p.add_argument("results", nargs="+")
    p.add_argument("--group", action="store_true",
                   help="also give mean ± std over runs whose names differ only by a _seedN suffix")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--extra", nargs="*", default=None, help="extra accuracy keys to show (e.g. top1_jpeg)")
    p.set_defaults(func=cmd_report)

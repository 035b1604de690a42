"""``detr-ptq qat``: Q-DETR-style quantization-aware training of a DETR (see docs/qat.md).

The config resolves as defaults <- ``--recipe`` YAML <- ``--policy`` <- ``--set key=value``; it is saved as
``OUT_DIR/config.yaml`` next to the outputs.
"""

from __future__ import annotations

import argparse

from gmpq.config import load_config


def run(args: argparse.Namespace) -> int:
    from detr_ptq.qat.config import QATConfig
    from detr_ptq.qat.train import qat

    overrides = ([f"policy={args.policy}"] if args.policy else []) + list(args.set)
    cfg = load_config(QATConfig, args.recipe, overrides)
    result = qat(cfg, resume=args.resume)
    if result:
        print(f"AP {result['AP']:.3f}  AP50 {result['AP50']:.3f}  (float AP50 "
              f"{result['float'].get('AP50', float('nan')):.3f}, before training "
              f"{result['before'].get('AP50', float('nan')):.3f}); wrote {result['checkpoint']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qat", help="quantization-aware training of a DETR (LSQ, quantized attention, Q-DETR "
                                   "distillation)", description=__doc__)
    p.add_argument("--recipe", default=None, help="YAML recipe of QATConfig fields (e.g. recipes/qat_detr_tiny.yaml)")
    p.add_argument("--policy", default=None, help="a gmpq-policy/1 file giving the bits per layer (default: the "
                                                  "uniform w_bits/a_bits/attn_bits settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set bits=4-4-8 --set fqm=true --set epochs=3 "
                        "--set out_dir=runs/qat/x")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt (a finished run "
                                                         "re-derives final.pth, result.json and policy.json)")
    p.set_defaults(func=run)
    register_report(sub)


def run_report(args: argparse.Namespace) -> int:
    from detr_ptq.qat.report import report

    print(report(args.folder, args.out))
    return 0


def register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qat-report", help="markdown tables from the result.json files of QAT runs")
    p.add_argument("folder", help="a folder whose subfolders are QAT out_dirs (e.g. runs/qat)")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    p.set_defaults(func=run_report)

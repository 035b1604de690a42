"""``detr-ptq train``: train a DETR from a recipe (see ``recipes/detr_tiny_digits.yaml``)."""

from __future__ import annotations

import argparse

from detr_ptq.engine.train import TrainConfig, train
from gmpq.config import load_config
from gmpq.detection.pycoco import format_metrics


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.recipe, args.set)
    metrics = train(cfg, resume=args.resume)
    if metrics:  # the main process (the others of a torchrun run return {})
        print(f"final ({cfg.val_split}): {format_metrics(metrics)}")
        print(f"model: {cfg.out_dir}/final.pth")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a DETR (AdamW, per-epoch checkpoints, --resume, TensorBoard)",
                       description=__doc__)
    p.add_argument("--recipe", default=None, help="YAML recipe of TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set epochs=3 --set out_dir=runs/x --set model.num_queries=30")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/checkpoint.pt (a finished run re-derives final.pth and metrics.json)")
    p.set_defaults(func=run)

"""``detr-ptq make-digits-coco``: write the offline digits detection dataset in COCO format."""

from __future__ import annotations

import argparse

from detr_ptq.data.digits_coco import DigitsConfig, make_digits_coco


def run(args: argparse.Namespace) -> int:
    cfg = DigitsConfig(canvas=args.canvas)
    counts = make_digits_coco(args.out, seed=args.seed, num_train=args.train, num_val=args.val, cfg=cfg)
    for split, n in counts.items():
        print(f"{split}: {getattr(args, split)} images, {n} boxes -> {args.out}/annotations/instances_{split}.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-digits-coco", help="generate the digits detection dataset (COCO json + PNGs)",
                       description=__doc__)
    p.add_argument("--out", required=True, help="output folder (annotations/, train/, val/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=4000, help="number of training images")
    p.add_argument("--val", type=int, default=500, help="number of held-out images")
    p.add_argument("--canvas", type=int, default=96, help="image side in pixels")
    p.set_defaults(func=run)

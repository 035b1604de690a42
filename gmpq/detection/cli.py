"""Detection verbs: ``gmpq finetune-det`` and ``gmpq evaluate-det``."""

from __future__ import annotations

import argparse
import dataclasses
import json

from gmpq.config import load_config
from gmpq.detection.config import DETECTOR_NAMES
from gmpq.errors import UserError

SUMMARY_KEYS = ("mAP_07", "mAP", "coco_AP", "coco_AP50", "before_finetune_mAP", "backbone_bops_g", "mapped_bops_g",
                "seconds_per_iter")


def _overrides(args: argparse.Namespace) -> list[str]:
    from gmpq.detection.datasets import parse_data_arg

    sets = list(args.set or [])
    for flag, key in (("detector", "detector.name"), ("policy", "policy"), ("backbone_weights",
                      "detector.backbone_weights"), ("init_detector", "init_detector"), ("epochs", "epochs"),
                      ("out_dir", "out_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    if args.data:
        d = parse_data_arg(args.data)
        sets += [f"data.format={d['format']}", f"data.root={d['root']}"]
    return sets


def cmd_finetune_det(args: argparse.Namespace) -> int:
    from gmpq.detection.config import DetFinetuneConfig
    from gmpq.detection.train import finetune_det

    cfg = load_config(DetFinetuneConfig, args.recipe, _overrides(args))
    result = finetune_det(cfg, resume=args.resume)
    print(json.dumps({k: result.get(k) for k in SUMMARY_KEYS}, indent=2))
    return 0


def cmd_evaluate_det(args: argparse.Namespace) -> int:

    from gmpq.detection.datasets import load_split, make_loader, parse_data_arg
    from gmpq.detection.evaluate import evaluate_detector
    from gmpq.detection.train import load_finetuned
    from gmpq.runtime import init_distributed

    device = init_distributed(args.device).device
    model, cfg, class_names = load_finetuned(args.checkpoint, device)
    data = cfg.data
    if args.data:
        d = parse_data_arg(args.data)
        data = dataclasses.replace(data, format=d["format"], root=d["root"], test_split=None)
    data = dataclasses.replace(data, test_split=args.split or data.test_split, eval_batch_size=args.batch_size,
                               num_workers=args.workers)
    ds = load_split(data, [data.resolved_test_split()], False, args.max_images)
    if ds.class_names != class_names:
        raise UserError(f"--data classes {ds.class_names} differ from the detector's classes {class_names}")
    metrics = evaluate_detector(model, ds, make_loader(ds, args.batch_size, False, args.workers), device,
                                progress=True)
    result = {"checkpoint": args.checkpoint, "data": data.format, "data_root": data.root,
              "split": data.resolved_test_split(), **metrics, "data_stats": ds.stats}
    print(json.dumps({k: v for k, v in result.items() if k != "per_class"}, indent=2))
    if args.out:
        from gmpq.io import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune-det", help="quantize a detector's backbone per a classification policy, fine-tune")
    p.add_argument("--recipe", default=None, help="YAML recipe (DetFinetuneConfig keys), e.g. recipes/det_*.yaml")
    p.add_argument("--detector", default=None, choices=DETECTOR_NAMES)
    p.add_argument("--policy", default=None, help="policy JSON of the source classifier (resnet18, vgg16, mobilenetv2)")
    p.add_argument("--data", default=None, help="voc:VOCDEVKIT, coco:FOLDER, or a folder (format detected)")
    p.add_argument("--backbone-weights", default=None, help="local state dict of the source classifier")
    p.add_argument("--init-detector", default=None,
                   help="model_final.pt of a trained float detector to start from (the setting init_detector)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out-dir", default=None, help="output folder (the setting out_dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, repeatable")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=cmd_finetune_det)

    p = sub.add_parser("evaluate-det", help="VOC mAP@0.5 (11-point and all-point) and COCO AP of a fine-tuned detector")
    p.add_argument("--checkpoint", required=True, help="model_final.pt written by gmpq finetune-det")
    p.add_argument("--data", default=None, help="test data (default: the fine-tuning run's)")
    p.add_argument("--split", default=None, help="VOC YEAR/SPLIT or COCO split (default: VOC2007/test, val2017)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.set_defaults(func=cmd_evaluate_det)

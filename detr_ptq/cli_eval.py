"""``detr-ptq eval``: COCO box AP of a DETR checkpoint on a COCO-layout folder; prints and writes JSON."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from torch.utils.data import DataLoader

from detr_ptq.data.coco import CocoDetection, coco_paths
from detr_ptq.data.transforms import DetrTransform, collate
from detr_ptq.engine.evaluate import evaluate
from detr_ptq.models.build import DETR_PRESETS
from detr_ptq.models.checkpoint import load_detr_with_file
from gmpq.cli import positive_int
from gmpq.detection.pycoco import format_metrics
from gmpq.errors import InputWarning
from gmpq.io import atomic_write_json, ensure_writable_dir
from gmpq.paths import expand_path

DEFAULT_OUT_DIR = "runs/eval"


def evaluate_checkpoint(checkpoint: str | Path, coco_dir: str | Path, split: str | None = None,
                        config: str | None = None, min_size: int | None = None, max_size: int | None = None,
                        batch_size: int = 2, progress: bool = True) -> dict:
    """Stage: (checkpoint, COCO folder) -> metrics dict. Image size defaults: 800/1333 for ``detr_r50`` (the
    official transform); the digits canvas (no resize) for checkpoints trained by ``detr-ptq train``."""
    model, _, post, cfg, raw = load_detr_with_file(expand_path(checkpoint), config)
    train_cfg = raw.get("train_config") or {}
    min_size = min_size or train_cfg.get("min_size", 800)
    max_size = max_size or train_cfg.get("max_size", 1333)
    ann, img_dir, split = coco_paths(expand_path(coco_dir), split)
    dataset = CocoDetection(img_dir, ann, DetrTransform(min_size, max_size))
    warn_unreachable_categories(dataset.coco, cfg.num_classes, str(checkpoint))
    loader = DataLoader(dataset, batch_size, shuffle=False, collate_fn=collate)
    metrics = evaluate(model, post["bbox"], loader, dataset.coco, progress=progress)
    return {"checkpoint": str(checkpoint), "config": cfg.name, "annotations": str(ann), "split": split,
            "images": len(dataset), "min_size": min_size, "max_size": max_size, **metrics}


def warn_unreachable_categories(gt: dict, num_classes: int, checkpoint: str) -> list[int]:
    """Warn (and return them) about ground-truth category ids the checkpoint cannot predict (id >= its
    ``num_classes``): those categories score AP 0 whatever the detector does, e.g. a digits model on COCO."""
    ids = sorted(c["id"] for c in gt.get("categories", []))
    out = [i for i in ids if i >= num_classes]
    if out:
        warnings.warn(f"{len(out)} of the dataset's {len(ids)} categories have ids >= {num_classes} ({out[:8]}"
                      f"{'...' if len(out) > 8 else ''}), which checkpoint {checkpoint!r} (num_classes "
                      f"{num_classes}) cannot predict: they score AP 0; is this the dataset it was trained for?",
                      InputWarning, stacklevel=2)
    return out


def run(args: argparse.Namespace) -> int:
    # the default is under runs/, never beside the checkpoint: that may sit inside the package (detr_ptq/assets)
    out = Path(args.out) if args.out else Path(DEFAULT_OUT_DIR) / f"{Path(args.checkpoint).stem}.eval.json"
    ensure_writable_dir(out.parent)  # fail before the evaluation, not after it
    result = evaluate_checkpoint(args.checkpoint, args.coco_dir, args.split, args.config, args.min_size,
                                 args.max_size, args.batch_size, args.progress)
    print(f"{result['split']} ({result['images']} images): {format_metrics(result)}")
    if not args.out:
        out = out.with_name(f"{Path(args.checkpoint).stem}.eval_{result['split']}.json")
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO box AP of a DETR checkpoint", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="{'model': state_dict} or a bare state dict")
    p.add_argument("--coco-dir", required=True, help="folder with annotations/instances_SPLIT.json and SPLIT/")
    p.add_argument("--split", default=None, help="SPLIT name (default: val2017, else val)")
    p.add_argument("--config", default=None, choices=sorted(DETR_PRESETS),
                   help="architecture (default: the config stored in the checkpoint, else detr_r50)")
    p.add_argument("--min-size", type=positive_int, default=None, help="shortest image side after resize, pixels")
    p.add_argument("--max-size", type=positive_int, default=None, help="longest image side at most, pixels")
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--out", default=None,
                   help=f"metrics JSON (default: {DEFAULT_OUT_DIR}/CHECKPOINT-STEM.eval_SPLIT.json)")
    p.set_defaults(func=run)

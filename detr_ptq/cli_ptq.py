"""``detr-ptq sensitivity | allocate | ptq | reproduce-table``: output-sensitivity Hessian mixed-precision PTQ.

Each verb resolves a dataclass config (defaults <- ``--recipe`` YAML <- the explicit flags <- ``--set k=v``)
and calls one stage function; see docs/ptq.md.
"""

from __future__ import annotations

import argparse

from gmpq.config import load_config


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """Explicit flags become ``--set`` overrides (applied before the user's own ``--set``)."""
    out = [f"{key}={getattr(args, attr)}" for attr, key in flags.items() if getattr(args, attr) is not None]
    return out + list(args.set)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from detr_ptq.ptq.sensitivity import SensitivityConfig
    from detr_ptq.ptq.stages import run_sensitivity

    cfg = load_config(SensitivityConfig, args.recipe, _overrides(args, {
        "checkpoint": "checkpoint", "calib_dir": "calib.data_dir", "calib_split": "calib.split",
        "num_images": "calib.num_images", "probes": "hutchinson.max_probes", "tol": "hutchinson.tol",
        "seed": "hutchinson.seed", "out_dir": "out_dir"}))
    res = run_sensitivity(cfg)
    print(f"wrote {res['path']} and {res['figure']}")
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from detr_ptq.ptq.stages import AllocateRun, run_allocate

    cfg = load_config(AllocateRun, args.recipe, _overrides(args, {
        "sensitivity": "sensitivity", "checkpoint": "checkpoint", "metric": "allocate.metric",
        "target": "allocate.target_bits", "out": "out"}))
    res = run_allocate(cfg)
    print(f"wrote {res['path']}")
    return 0


def cmd_ptq(args: argparse.Namespace) -> int:
    from detr_ptq.ptq.apply import PTQConfig
    from detr_ptq.ptq.stages import run_ptq

    cfg = load_config(PTQConfig, args.recipe, _overrides(args, {
        "checkpoint": "checkpoint", "coco_dir": "coco_dir", "split": "split", "policy": "policy",
        "w_bits": "w_bits", "out": "out"}))
    res = run_ptq(cfg)
    print(f"wrote {res['path']}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from detr_ptq.ptq.table import TableConfig, run_table

    cfg = load_config(TableConfig, args.recipe, _overrides(args, {
        "checkpoint": "checkpoint", "coco_dir": "coco_dir", "split": "split", "calib_dir": "calib.data_dir",
        "calib_split": "calib.split", "out_dir": "out_dir"}))
    res = run_table(cfg)
    print(res["markdown"])
    print(f"wrote {res['out_dir']}/table.md and table.json")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="YAML recipe of config fields (e.g. recipes/ptq_detr_tiny.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set hutchinson.max_probes=100")
    p.add_argument("--checkpoint", default=None, help="DETR checkpoint ({'model': state_dict, 'config': ...})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="Hutchinson Hessian traces per layer (loss, output-float, output-quant)",
                       description=cmd_sensitivity.__doc__ or __doc__)
    _common(p)
    p.add_argument("--calib-dir", default=None, help="COCO-layout folder of calibration images")
    p.add_argument("--calib-split", default=None, help="split of the calibration folder (default train)")
    p.add_argument("--num-images", type=int, default=None, help="calibration images (default 100)")
    p.add_argument("--probes", type=int, default=None, help="Hessian-vector products at most (default 50)")
    p.add_argument("--tol", type=float, default=None, help="stop when every relative standard error < tol")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("allocate", help="ILP bit allocation from Hessian traces -> policy JSON", description=__doc__)
    _common(p)
    p.add_argument("--sensitivity", default=None, help="sensitivity.json from `detr-ptq sensitivity`")
    p.add_argument("--metric", default=None, choices=["loss", "output-float", "output-quant"])
    p.add_argument("--target", type=float, default=None, help="average weight bits (e.g. 4, 5, 6)")
    p.add_argument("--out", default=None, help="policy JSON path")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("ptq", help="apply a policy or uniform bits to the weights and evaluate COCO AP",
                       description=__doc__)
    _common(p)
    p.add_argument("--coco-dir", default=None, help="COCO-layout evaluation folder")
    p.add_argument("--split", default=None)
    p.add_argument("--policy", default=None, help="policy JSON (omit for uniform --w-bits)")
    p.add_argument("--w-bits", type=int, default=None, help="uniform weight bits when no policy is given")
    p.add_argument("--out", default=None, help="metrics JSON path (default runs/ptq/<policy stem>.ptq_result.json; "
                   "never a policy file)")
    p.set_defaults(func=cmd_ptq)

    p = sub.add_parser("reproduce-table", help="the paper's Table 1: float, uniform 8/6/5/4, three metrics x "
                       "targets 6/5/4", description=__doc__)
    _common(p)
    p.add_argument("--coco-dir", default=None, help="COCO-layout evaluation folder")
    p.add_argument("--split", default=None)
    p.add_argument("--calib-dir", default=None, help="COCO-layout folder of calibration images")
    p.add_argument("--calib-split", default=None)
    p.add_argument("--out-dir", default=None)
    p.set_defaults(func=cmd_table)

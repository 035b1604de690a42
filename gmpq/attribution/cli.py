"""``gmpq attribution --model M --weights W [--policy P | --quant-weights Q] --data D --out DIR``."""

from __future__ import annotations

import argparse
import json


def cmd_attribution(args: argparse.Namespace) -> int:
    from gmpq.attribution.run import AttributionConfig, run_attribution
    from gmpq.data import DataConfig
    from gmpq.deploy.datasets import data_arg

    cfg = AttributionConfig(model=args.model, num_classes=args.num_classes, weights=args.weights,
                            policy=args.policy, quant_weights=args.quant_weights,
                            data=DataConfig(**data_arg(args.data), augment=False), images=args.images,
                            grid=args.grid, top=args.top, layer=args.layer, target=args.target,
                            calib_batches=args.calib_batches, device=args.device, out_dir=args.out_dir)
    result = run_attribution(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "ard_per_image"}, indent=2))
    print(f"wrote {args.out_dir}/attribution.json" + (f" and {args.out_dir}/gradcam_grid.png" if args.grid else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribution", help="Grad-CAM (captum) of float vs quantized model: ARD, overlay grid",
                       description="Attribution Rank Distance (GMPQ paper, Fig. 1b: mean rank displacement of the "
                       "float model's top pixels) between the float model and its quantized version, with a PNG grid "
                       "of Grad-CAM overlays. Without --policy/--quant-weights the model is compared with itself.")
    p.add_argument("--model", required=True, help="registered model name (see `gmpq models`)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--weights", required=True, help="float weights")
    p.add_argument("--policy", default=None, help="policy to quantize the float model with (then calibrated)")
    p.add_argument("--quant-weights", default=None, help="a quantized checkpoint instead (e.g. from gmpq finetune)")
    p.add_argument("--data", required=True, help="dataset (--data syntax of gmpq evaluate); its test split is used")
    p.add_argument("--images", type=int, default=256, help="test images compared (default 256)")
    p.add_argument("--grid", type=int, default=8, help="rows of the overlay grid (0: no PNG)")
    p.add_argument("--top", type=int, default=100, help="top pixels of the float map (paper: 100)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default: the model's last feature map)")
    p.add_argument("--target", default="float", choices=["float", "label"],
                   help="class both maps explain: the float model's prediction (default) or the label")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out-dir", required=True, help="output folder")
    p.set_defaults(func=cmd_attribution)

"""Deployment: onnxruntime CPU latency of the integer ONNX export against the float ONNX model, side by side.

For each case the model is quantized post-training (calibration as ``gmpq evaluate --policy``), written by
``gmpq.deploy.export_model.write_deploy_files`` (packed file, QDQ reference, integer and float ONNX), plus the
integer ONNX in the other output mode (``--int-outputs uint8``: residual outputs requantized, see
gmpq/quant/onnx_outputs.py), and timed in one process: every round runs the float model and both integer models
once each (rotating order) on the same batch, and the speed-up is the median of the per-round ratios
(``gmpq.deploy.latency``). One intra-op thread by default.

Cases: ``resnet20_w8a8`` (uniform W8A8, first conv and classifier float, as ``gmpq policy uniform``),
``resnet20_w7a8`` (7-bit weights: codes fit onnxruntime's fast u8s8 kernels, see gmpq/quant/onnx_integer.py),
``resnet20_mixed`` (a random mixed policy, weights and activations 4..8 bits, at the BOPs of uniform W6A6,
seed 0), ``mobilenetv2_w8a8`` / ``mobilenetv2_w7a8`` (the ImageNet MobileNetV2, 224x224). With ``$GMPQ_DATA``
the pretrained weights are used, calibrated on real training images, and top-1 is measured (CIFAR-10 lossless
test subset; ImageNet ``val_1300``); without it, random weights and random calibration inputs (latency only).

    python benchmarks/bench_deploy.py [--quick] [--cases resnet20_w8a8 mobilenetv2_w8a8] [--rounds 15]
        [--threads 1] [--out runs/bench_deploy]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

CASES = ("resnet20_w8a8", "resnet20_w7a8", "resnet20_mixed", "mobilenetv2_w8a8", "mobilenetv2_w7a8")
QUICK = ("resnet20_w8a8",)


def _data_root() -> Path | None:
    root = os.environ.get("GMPQ_DATA")
    return Path(root) if root and Path(root).is_dir() else None


def _policy(case: str, model, spec):
    from gmpq.quant import uniform_policy
    from gmpq.quant.cost import cost_summary
    from gmpq.quant.random_policy import random_policy

    keep = (spec.first_layer, spec.classifier)
    if case.endswith("_mixed"):
        w6 = uniform_policy(model, spec.name, 6, 6, keep_full_precision=keep)
        from gmpq.quant import layer_bits

        bops = cost_summary(model, layer_bits(w6, model), spec.input_size)["bops"]
        return random_policy(model, spec.name, bops, spec.input_size, 0, (4, 5, 6, 7, 8), keep)
    w = int(case.split("_w")[1][0])
    return uniform_policy(model, spec.name, w, 8, keep_full_precision=keep)


class _ValList(torch.utils.data.Dataset):
    """ImageNet ``val_1300``: ``images/`` and ``labels.txt`` (``<file> <class>``); resize 256, center crop 224."""

    def __init__(self, root: Path, limit: int | None = None):
        from torchvision import transforms as T

        from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD

        rows = [ln.split() for ln in (root / "labels.txt").read_text().splitlines()][:limit]
        self.items = [(root / "images" / f, int(c)) for f, c in rows]
        self.tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, y = self.items[i]
        return self.tf(Image.open(path).convert("RGB")), y


def _data(name: str, spec, root: Path | None, calib_batches: int, batch: int, test_images: int | None):
    """(calibration input batches, test loader or None)."""
    from torch.utils.data import DataLoader, Subset

    from gmpq.data import DataConfig, build_dataset

    if root is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randn(batch, *spec.input_size, generator=g) for _ in range(calib_batches)], None
    if name == "resnet20":
        cfg = DataConfig(name="cifar10_npz", root=str(root / "cifar10"), augment=False)
        train = build_dataset(cfg, "train", train_transform=False)
        test = build_dataset(cfg, "test", train_transform=False)
    else:
        cfg = DataConfig(name="imagefolder", root=str(root / "imagenet" / "imagenette"), augment=False)
        train = build_dataset(cfg, "train", train_transform=False)
        test = _ValList(root / "imagenet" / "val_1300")
    loader = DataLoader(train, batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    calib = [x for (x, _), _ in zip(loader, range(calib_batches))]
    if test_images is not None:
        test = Subset(test, range(min(test_images, len(test))))
    return calib, (DataLoader(test, 64) if test_images != 0 else None)


def run_case(case: str, args) -> dict:
    from gmpq.deploy.evaluate import evaluate
    from gmpq.deploy.export_model import ExportConfig, OrtClassifier, write_deploy_files
    from gmpq.deploy.latency import compare_latency
    from gmpq.models import create_model, model_spec
    from gmpq.quant import apply_policy, calibrate
    from gmpq.quant.onnx_integer import export_integer_onnx

    name = case.split("_")[0]
    spec, root = model_spec(name), _data_root()
    weights = None
    if root is not None:
        weights = root / ("cifar_resnets/resnet20-12fca82f.th" if name == "resnet20"
                          else "imagenet/mobilenet_v2_imagenet.pth")
    model = create_model(name, weights=weights).eval()
    policy = _policy(case, model, spec)
    apply_policy(model, policy)
    batch = 64 if name == "resnet20" else 32
    calib, test = _data(name, spec, root, args.calib_batches, batch, 0 if args.quick else args.test_images)
    calibrate(model, calib, len(calib), seed=0)
    cfg = ExportConfig(model=name, weights=str(weights), latency_rounds=args.rounds, threads=args.threads,
                       latency=False)
    t0 = time.time()
    out = Path(args.out) / case / f"{name}.gmpq"
    rep = write_deploy_files(model, policy, spec.input_size, out, calib, test, cfg)
    # the other output mode (module docstring): timed in the same interleaved rounds, scored on the same images
    uint8_path = out.with_suffix(".int_uint8.onnx")
    rep["integer_onnx_uint8"] = export_integer_onnx(model, calib[0][:1], uint8_path, calib, outputs="uint8").as_dict()
    if test is not None:
        rep["top1"]["onnx_integer_uint8_optimized"] = evaluate(OrtClassifier(uint8_path, args.threads), test)["top1"]
    rep["latency"] = compare_latency({"float": rep["onnx_float_path"], "integer": rep["onnx_integer_path"],
                                      "integer_uint8": uint8_path}, tuple(spec.input_size), cfg.batch_sizes,
                                     args.rounds, threads=args.threads)
    rep.update(case=case, seconds=time.time() - t0, pretrained=weights is not None)
    return rep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"short settings for `make bench`: {QUICK}, 5 rounds, "
                   "no top-1")
    p.add_argument("--cases", nargs="+", default=None, choices=CASES)
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--test-images", type=int, default=None, help="top-1 on the first N test images (default all)")
    p.add_argument("--out", default="runs/bench_deploy")
    args = p.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 5)
    torch.set_num_threads(args.threads)
    cases = args.cases or (QUICK if args.quick else CASES)
    rows = [run_case(c, args) for c in cases]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_deploy.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"onnxruntime CPU, {args.threads} thread(s), median of {args.rounds} interleaved rounds; speed-up = "
          "float time / integer time (CPU time of the process; wall clock in the JSON). int = integer ONNX with "
          "exact float outputs (ConvInteger, default), int-u8 = residual outputs requantized to uint8")
    print("| case | top-1 float / fake-quant / ORT int / ORT int-u8 (%) | CPU ms/img float, int, int-u8: b1 | b32 "
          "| speed-up int, int-u8: b1 | b32 | size KB packed / int ONNX / float ONNX |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lat, t, s = r["latency"]["batch"], r.get("top1"), r["sizes_bytes"]
        acc = "-"
        if t:
            acc = " / ".join(f"{100 * t[k]:.2f}" for k in ("float", "fake_quant", "onnx_integer_optimized",
                                                             "onnx_integer_uint8_optimized")) + f" (n={t['n_test']})"
        ms = {b: ", ".join(f"{lat[b]['cpu_ms_per_image'][k]:.2f}" for k in ("float", "integer", "integer_uint8"))
              for b in (1, 32)}
        sp = {b: ", ".join(f"{lat[b]['cpu_speedup'][k]:.2f}" for k in ("integer", "integer_uint8")) for b in (1, 32)}
        print(f"| {r['case']} | {acc} | {ms[1]} | {ms[32]} | {sp[1]} | {sp[32]} | "
              f"{s['packed'] / 1024:.0f} / {s['onnx_integer'] / 1024:.0f} / {s['onnx_float'] / 1024:.0f} |")
    print(f"wrote {Path(args.out) / 'bench_deploy.json'}")


if __name__ == "__main__":
    main()

"""Deploy a mixed-precision policy (searched on CIFAR-10) on the ImageNet MobileNetV2, and tabulate the results.

    python scripts/transfer_mobilenetv2_imagenet.py deploy --policy P.json --out DIR [--ft-epochs 2] [--seed 0]
    python scripts/transfer_mobilenetv2_imagenet.py table DIR/deploy_* --out DIR/table.md

``deploy``: the ImageNet MobileNetV2 of ``$GMPQ_DATA/imagenet`` (strict load), the policy applied (it must validate
on this model by layer name), activations calibrated on Imagenette train, then (``--ft-epochs`` > 0) fine-tuned on
the Imagenette train images with their ImageNet labels, cross-entropy + distillation from the float model, with the
project's training engine (``gmpq.runtime.fit``). Evaluated 1000-way on ``imagenet/val_1300`` and on Imagenette val
(1000-way and 10-way: the argmax over the 10 Imagenette classes). Writes ``DIR/result.json``.
``table``: mean and standard deviation over seeds per method (markdown).

``scripts/transfer_mobilenetv2_imagenet.sh`` runs the whole experiment (searches, budget-exact policies, baselines,
deployments, table). The datasets here are script-local: the ImageNet labels come from ``synset_words.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.deploy.finetune import loss_terms, quantized_result
from gmpq.io import atomic_write_json, atomic_write_text, load_image
from gmpq.models import create_model, model_spec
from gmpq.quant import apply_policy, calibrate, layer_bits, load_policy

MODEL = "mobilenetv2"


def data_root() -> Path:
    return Path(os.environ.get("GMPQ_DATA", "../shared/data")) / "imagenet"


def transforms(train: bool, size: int = 224):
    """Training: random resized crop to ``size`` (a smaller size makes a CPU fine-tune cheaper; the network is fully
    convolutional up to its global pool); evaluation: resize 256, centre crop 224."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(256), T.CenterCrop(224), *norm])


class Val1300(Dataset):
    """``val_1300/images`` with ``labels.txt`` (``<file> <ImageNet class 0..999>``)."""

    def __init__(self, root: Path):
        self.root = root
        self.rows = [(f, int(c)) for f, c in (ln.split() for ln in (root / "labels.txt").read_text().splitlines())]
        self.tf = transforms(False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        f, c = self.rows[i]
        return self.tf(load_image(self.root / "images" / f)), c


def imagenette(split: str, train_tf: bool, size: int = 224):
    """Imagenette ``split`` (train | val) as an ImageFolder whose labels are ImageNet class indices (1000-way)."""
    from torchvision.datasets import ImageFolder

    wnids = [ln.split()[0] for ln in (data_root() / "synset_words.txt").read_text().splitlines()]
    ds = ImageFolder(str(data_root() / "imagenette" / split), transform=transforms(train_tf, size))
    to_imagenet = {i: wnids.index(w) for w, i in ds.class_to_idx.items()}
    ds.target_transform = to_imagenet.__getitem__
    ds.imagenet_classes = sorted(to_imagenet.values())
    return ds


def limited(ds: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """``limit`` items picked at random (seeded), or all."""
    if limit is None or limit >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return Subset(ds, idx.tolist())


@torch.no_grad()
def accuracy(model: nn.Module, ds: Dataset, classes: list[int] | None = None, batch: int = 50) -> dict:
    """Top-1 1000-way (and, with ``classes``, restricted to those classes) of ``model`` on ``ds``."""
    model.eval()
    hit = hit_sub = n = 0
    for x, y in DataLoader(ds, batch):
        logits = model(x)
        hit += int((logits.argmax(1) == y).sum())
        if classes is not None:
            sub = torch.tensor(classes)
            hit_sub += int((sub[logits[:, sub].argmax(1)] == y).sum())
        n += len(y)
    out = {"top1": hit / n, "n": n}
    if classes is not None:
        out["top1_10way"] = hit_sub / n
    return out


def deploy(args: argparse.Namespace) -> dict:
    from gmpq.runtime import RunConfig, Task, fit, init_distributed
    from gmpq.runtime.modes import train_mode

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = data_root() / "mobilenet_v2_imagenet.pth"
    teacher = create_model(MODEL, weights=weights).eval().requires_grad_(False)
    model = create_model(MODEL, weights=weights)
    policy = None
    if args.policy:
        policy = load_policy(args.policy)
        apply_policy(model, policy, source=f"policy file {args.policy!r}", model_name=MODEL)
    train = imagenette("train", train_tf=True, size=args.train_size)
    calib = DataLoader(limited(imagenette("train", train_tf=False), args.calib_images, args.seed), 16, shuffle=False)
    calibrate(model, calib, num_batches=len(calib))
    val = limited(Val1300(data_root() / "val_1300"), args.val_images, 0)
    nette = imagenette("val", train_tf=False)
    nette_eval = limited(nette, args.nette_images or args.val_images, 0)
    result = {"policy": args.policy, "method": policy["created_by"]["method"] if policy else "float",
              "seed": args.seed, "ft_epochs": args.ft_epochs, "ft_max_steps": args.max_steps,
              "train_size": args.train_size, "batch_size": args.batch_size, "lr": args.lr}
    if args.ft_epochs > 0:
        info = init_distributed("cpu" if args.threads else "auto")
        model.to(info.device)
        teacher.to(info.device)

        def step(net, batch):
            x, y = batch[0].to(info.device), batch[1].to(info.device)
            with torch.no_grad():
                t = teacher(x)
            return loss_terms(net(x), y, t, temperature=4.0)

        run = RunConfig(out_dir=str(Path(args.out) / "finetune"), epochs=args.ft_epochs, seed=args.seed,
                        threads=args.threads, milestones=[0.5, 0.75], max_steps_per_epoch=args.max_steps,
                        progress=False)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        task = Task(model=model, optimizer=opt, loader=DataLoader(train, args.batch_size, shuffle=True),
                    loss_terms=step,
                    weights={"ce": 1.0, "kd": 1.0}, name="imagenet-finetune",
                    on_epoch_start=lambda e: train_mode(model, frozen_bn=True))  # BN folded: identity BN layers
        fit(task, run, info)
        model.cpu()
    v = accuracy(model, val)
    nv = accuracy(model, nette_eval, nette.imagenet_classes)
    result |= {"top1_val1300": v["top1"], "n_val1300": v["n"], "top1_imagenette": nv["top1"],
               "top1_imagenette_10way": nv["top1_10way"], "n_imagenette": nv["n"]}
    if policy is not None:
        result |= quantized_result(model, layer_bits(policy, model), model_spec(MODEL).input_size)
        result["quantized_bops_g"] = policy.get("summary", {}).get("quantized_bops_g")
    atomic_write_json(Path(args.out) / "result.json", result)
    print(json.dumps(result, indent=2))
    return result


def teacher(args: argparse.Namespace) -> None:
    """Fine-tune the float search-time MobileNetV2 (ImageNet init, 10-class head) on the search subset once, so that
    every search (each method, each seed) uses the same teacher and warm start: ``--set weights=OUT/teacher/...``."""
    from gmpq.config import load_config
    from gmpq.data.datasets import build_loaders
    from gmpq.models import load_weights
    from gmpq.runtime import init_distributed
    from gmpq.search.config import SearchConfig
    from gmpq.search.setup import build_model, pretrain_teacher, search_image_shape, uses_search_variant

    cfg = load_config(SearchConfig, args.recipe, [*args.set, f"out_dir={args.out}"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    info = init_distributed(cfg.device)
    train, test = build_loaders(cfg.data)
    model = build_model(cfg, uses_search_variant(cfg, search_image_shape(train))).to(info.device)
    load_weights(model, cfg.init_weights, strict=False)  # the 1000-class head keeps its random init
    pretrain_teacher(model, cfg, info, train, test, resume=True)


def _cell(vals: list[float]) -> str:
    """``mean ± sample std`` (one value: the value; none: ``-``)."""
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def grad_shares(run: Path) -> dict[str, float]:
    """Mean over a search's epochs of each loss term's share ``g_k / sum_j g_j`` of the gradient norms sent to the
    importance logits (``grad_*`` of ``log.jsonl``)."""
    epochs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]
    shares = defaultdict(list)
    for rec in epochs:
        g = {k.removeprefix("grad_"): v for k, v in rec.items() if k.startswith("grad_") and v is not None}
        for k, v in g.items():
            shares[k].append(v / sum(g.values()))
    return {k: statistics.mean(v) for k, v in shares.items()}


def table(args: argparse.Namespace) -> str:
    groups = defaultdict(list)
    for d in args.runs:
        r = json.loads((Path(d) / "result.json").read_text())
        ard = Path(d) / "attribution" / "attribution.json"
        if ard.is_file():
            r["ard"] = json.loads(ard.read_text())["ard_mean"]
        groups[Path(d).name.removeprefix("deploy_").rsplit("_seed", 1)[0]].append(r)
    keys = ["top1_val1300", "top1_imagenette", "top1_imagenette_10way", "ard", "bops_g", "quantized_bops_g",
            "size_mb"]
    lines = ["| method | seeds | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name, rs in sorted(groups.items()):
        cells = [_cell([r[k] for r in rs if r.get(k) is not None]) for k in keys]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    if args.searches:
        per = defaultdict(list)
        for d in args.searches:
            per[Path(d).name.removeprefix("search_").rsplit("_seed", 1)[0]].append(grad_shares(Path(d)))
        terms = sorted({k for runs in per.values() for s in runs for k in s})
        lines += ["", "Share of the gradient norm on the importance logits per loss term (mean over epochs; "
                  "mean ± std over seeds):", "", "| search | seeds | " + " | ".join(terms) + " |",
                  "|---|---:|" + "---:|" * len(terms)]
        for name, runs in sorted(per.items()):
            cells = [_cell([s[k] for s in runs if k in s]) for k in terms]
            lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("deploy")
    p.add_argument("--policy", default=None, help="policy JSON (omit: the float model)")
    p.add_argument("--out", required=True)
    p.add_argument("--ft-epochs", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="cap the fine-tuning steps per epoch")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--val-images", type=int, default=None, help="evaluate on a seeded subset (default: all)")
    p.add_argument("--nette-images", type=int, default=None, help="Imagenette val subset (default: --val-images)")
    p.add_argument("--train-size", type=int, default=224, help="fine-tuning crop size (evaluation stays 224)")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=deploy)
    p = sub.add_parser("teacher", help="the shared float teacher of the searches: OUT/teacher/checkpoint.pt")
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", action="append", default=[], help="recipe override key=value (as gmpq search --set)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=teacher)
    p = sub.add_parser("table")
    p.add_argument("runs", nargs="+", help="deploy output folders named deploy_<method>_seed<S>")
    p.add_argument("--searches", nargs="*", default=[],
                   help="search folders (search_<method>_seed<S>): gradient shares")
    p.add_argument("--out", default=None)
    p.set_defaults(func=table)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

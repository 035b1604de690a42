"""``gmpq search --recipe recipes/<name>.yaml [--set key=value ...] [--resume]``: a thin verb over ``run_search``."""

from __future__ import annotations

import argparse


def cmd_search(args: argparse.Namespace) -> int:
    from gmpq.config import load_config  # late imports: ``gmpq --help`` stays fast
    from gmpq.search.config import SearchConfig
    from gmpq.search.train import run_search

    cfg = load_config(SearchConfig, args.recipe, args.set)
    if args.out_dir:
        cfg.out_dir = args.out_dir
    metrics = run_search(cfg, resume=args.resume)
    if metrics.get("epoch", 0) >= cfg.epochs and "bops_g" in metrics:
        print(f"search finished: policy {cfg.out_dir}/policy.json ({metrics['bops_g']:.4f} GBOPs, "
              f"avg weight bits {metrics['avg_w_bits']:.2f}, hypernet test acc {metrics['test_acc']:.4f})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="GMPQ / EdMIPS mixed-precision search: writes a policy.json",
                              description="Search a mixed-precision policy with the GMPQ hypernet (CE + zeta BOPs "
                              "+ eta attribution loss; eta=0 is EdMIPS). Writes config.yaml, checkpoint.pt, "
                              "policy.json, policy_bits.png, log.jsonl and tb/ in out_dir.")
    p.add_argument("--recipe", required=False, default=None, help="YAML recipe (e.g. recipes/quickstart.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set epochs=3 --set loss.eta=0 (repeatable)")
    p.add_argument("--out-dir", default=None, help="output folder (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt")
    p.set_defaults(func=cmd_search)

"""Print the gradient norm that each weighted loss term (CE, zeta R_C, eta R_G) sends to the importance logits, at
the start of a search (after the teacher is ready and the hypernet calibrated), averaged over a few batches.

    python scripts/grad_shares.py --recipe recipes/resnet20_cifar10.yaml [--set key=value ...] [--batches 4]

The default eta (``gmpq.search.config.LossConfig``) was chosen with it: the attribution term's norm should be of
the order of the complexity term's. The last line is JSON (one record per run) for scripts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from gmpq.config import load_config
from gmpq.data import build_loaders
from gmpq.runtime import init_distributed
from gmpq.search.config import SearchConfig
from gmpq.search.losses import grad_shares
from gmpq.search.probe import mean_logit_grad_norms
from gmpq.search.setup import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args()
    cfg = load_config(SearchConfig, args.recipe, args.set)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    d = init_distributed(cfg.device)
    train_loader, _ = build_loaders(cfg.data)
    s, _, _ = prepare(cfg, d, train_loader, None)
    norms = mean_logit_grad_norms(s, itertools.islice(train_loader, args.batches), d.device)
    shares = grad_shares(norms)
    print(f"{cfg.model} (zeta {cfg.loss.zeta}, eta {cfg.loss.eta}, {cfg.loss.complexity_mode}): gradient norm on the "
          "importance logits per weighted term, mean over batches")
    for k, v in norms.items():
        print(f"  {k:12s} {v:.4e}  share {shares[k]:.3f}")
    print(json.dumps({"model": cfg.model, "zeta": cfg.loss.zeta, "eta": cfg.loss.eta, "norms": norms,
                      "shares": shares, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()

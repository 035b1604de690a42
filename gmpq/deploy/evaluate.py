"""Classification accuracy (top-1/top-5) of any model on a loader, summed over processes when distributed."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from gmpq.runtime import DistInfo, reduce_sum
from gmpq.runtime.progress import progress as gmpq_progress


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
             info: DistInfo | None = None, max_batches: int | None = None, progress: bool = False
             ) -> dict[str, float]:
    """Returns ``{"top1", "top5", "loss", "n"}``; accuracies are fractions in [0, 1], loss is mean cross-entropy.
    ``progress``: report the batches done on the main process (a bar on a terminal, plain lines in a log)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    batches = gmpq_progress(loader, total, "evaluation", progress and (info is None or info.is_main), unit="batch")
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == y[:, None]
        totals += torch.tensor([hit[:, 0].sum().item(), hit.any(dim=1).sum().item(),
                                nn.functional.cross_entropy(logits, y, reduction="sum").item(), len(y)],
                               dtype=torch.float64)
    model.train(was_training)
    if info is not None and info.distributed and isinstance(loader.sampler, DistributedSampler):
        totals = reduce_sum(totals, info)
    n = max(totals[3].item(), 1)
    return {"top1": totals[0].item() / n, "top5": totals[1].item() / n, "loss": totals[2].item() / n,
            "n": int(totals[3].item())}

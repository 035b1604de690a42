"""Plumbing of the search run: device and process group, gradient all-reduce, the teacher, checkpoints, logs.

Distributed runs (``torchrun --nproc_per_node N -m gmpq search ...``) use gloo on CPU and nccl on GPU. Gradients are
averaged with one all-reduce per step instead of DDP, because the student Grad-CAM differentiates through
``torch.autograd.grad(create_graph=True)``, which DDP's reducer does not support.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from gmpq.errors import UserError


class Dist:
    """Rank, world size and device of this process."""

    def __init__(self, device_pref: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise UserError("device='cuda' but no CUDA device is available; accepted values: ['auto', 'cpu', 'cuda']")
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing outputs; leaving early can abort gloo's peer threads
            dist.destroy_process_group()


@torch.no_grad()
def broadcast_state(model: nn.Module, d: Dist) -> None:
    """Make every rank start from rank 0's parameters and buffers (weights, logits, PACT clips, BN stats)."""
    if d.world > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


@torch.no_grad()
def allreduce_grads(params: list[nn.Parameter], d: Dist) -> None:
    """Average gradients over ranks with one flat all-reduce (missing gradients count as zero)."""
    if d.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def allreduce_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def inputs_to(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def pretrain_float(model: nn.Module, loader: Iterable, epochs: int, lr: float, d: Dist,
                   max_steps: int | None = None) -> None:
    """Train the float model with Adam + cross-entropy (a quick teacher when no pretrained weights are given)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for epoch in range(epochs):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(10_000 + epoch)
        for step, batch in enumerate(loader):
            if max_steps is not None and step >= max_steps:
                break
            x, y = inputs_to(batch, d.device)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            allreduce_grads(params, d)
            opt.step()


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never changes."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

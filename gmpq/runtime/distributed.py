"""Distributed setup for ``torchrun --nproc_per_node N -m gmpq <verb>``: gloo on CPU, nccl on GPU."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from gmpq.errors import UserError


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); otherwise a single process.

    ``device``: "auto" (cuda if available), "cpu" or "cuda".
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA device is available; accepted values: ['auto', 'cpu', 'cuda']")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # Long timeout: some loops evaluate on rank 0 only (a COCO evaluation can take longer than the default
        # 10 minutes while the other ranks wait at the next collective).
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=3))
    if use_cuda:
        torch.cuda.set_device(local)
    return DistInfo(rank, world, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def shutdown_distributed(info: DistInfo) -> None:
    """Wait for every rank, then leave the process group (a rank that leaves while a peer is still busy can make
    gloo abort the process at exit)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_state(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every process (after a step that may differ between ranks)."""
    if info.distributed:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def any_process(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is True on any process (one small all-reduce; the local flag for one process)."""
    if not info.distributed:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over processes (a copy; identity for one process)."""
    t = t.detach().clone()
    if info.distributed:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def allreduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average gradients over processes with one flat all-reduce (a missing gradient counts as zero). For steps
    that DDP cannot wrap, e.g. the search's Grad-CAM, which differentiates with ``create_graph=True``."""
    if not info.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n

"""Machinery shared by every training stage: the training engine, checkpoints, run logs, progress, distributed."""

from gmpq.runtime.checkpoint import load_checkpoint, save_checkpoint
from gmpq.runtime.distributed import (
    DistInfo,
    allreduce_grads,
    any_process,
    broadcast_state,
    init_distributed,
    reduce_sum,
    shutdown_distributed,
)
from gmpq.runtime.engine import CHECKPOINT, Fit, Task, fit, load_resume
from gmpq.runtime.progress import Progress, progress
from gmpq.runtime.runlog import RunLog, set_seed
from gmpq.runtime.settings import RENAMED, RunConfig

__all__ = ["CHECKPOINT", "RENAMED", "DistInfo", "Fit", "Progress", "RunConfig", "RunLog", "Task", "allreduce_grads",
           "any_process", "broadcast_state", "fit", "init_distributed", "load_checkpoint",
           "load_resume", "progress", "reduce_sum", "save_checkpoint", "set_seed",
           "shutdown_distributed"]

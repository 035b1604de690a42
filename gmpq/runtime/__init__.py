"""Machinery shared by every training loop: checkpoints with resume, the NaN guard, run logs, distributed setup."""

from gmpq.runtime.checkpoint import check_finite, load_checkpoint, restore_training, save_checkpoint
from gmpq.runtime.distributed import (
    DistInfo,
    any_process,
    broadcast_state,
    init_distributed,
    reduce_sum,
    shutdown_distributed,
)
from gmpq.runtime.runlog import RunLog, set_seed

__all__ = ["DistInfo", "RunLog", "any_process", "broadcast_state", "check_finite", "init_distributed",
           "load_checkpoint", "reduce_sum", "restore_training", "save_checkpoint", "set_seed", "shutdown_distributed"]

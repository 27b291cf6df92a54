"""Which process speaks: the job's rank, before the process group exists (torchrun's RANK) and after."""

from __future__ import annotations

import os

import torch.distributed as dist


def global_rank() -> int:
    """This process's rank in the job: the process group's once joined, torchrun's RANK before (0 alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    """Whether this process speaks for all: checks that agree on every rank are said once, by rank 0."""
    return global_rank() == 0

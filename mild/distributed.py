"""Joining torchrun's process group: shared by `mild train` and `mild erase --input-dir`."""

from __future__ import annotations

import os


def distributed_rank() -> tuple[int, int]:
    """(rank, world size), joining the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()

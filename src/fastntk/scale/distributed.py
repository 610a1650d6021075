"""Ranks: torch.distributed when it is initialised or when torchrun's environment asks for it.

Under ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR set, WORLD_SIZE > 1) the process group is
initialised here if the caller has not: backend NCCL when the model is on a CUDA device,
gloo otherwise, with a long timeout (ranks may finish their blocks far apart). Without
any of that, a single rank.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("fastntk.gram")

TIMEOUT = datetime.timedelta(hours=int(os.environ.get("FASTNTK_GRAM_TIMEOUT_HOURS", "24")))
"""How long a collective waits for the slowest rank when this module initialises the group."""


@dataclass
class Group:
    """This process's rank among ``world`` (1: not distributed)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if self.device is not None and self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank. An exception from rank 0 is raised everywhere."""
        if self.distributed:
            import torch.distributed as dist

            box = [value]
            dist.broadcast_object_list(box, src=0, device=self.device if self.nccl else None)
            value = box[0]
        if isinstance(value, BaseException):
            raise value
        return value

    @property
    def nccl(self) -> bool:
        import torch.distributed as dist

        return self.distributed and dist.get_backend() == "nccl"

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist

        dist.send(tensor.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        import torch.distributed as dist

        dist.recv(tensor, src)


def join(device: torch.device) -> Group:
    """The group of this run: the initialised one, torchrun's (initialised now), or a single rank."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return Group()
    if not dist.is_available():
        return Group()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
            return Group()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        atexit.register(_destroy)
        log.info("initialised torch.distributed: backend %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    if dist.get_world_size() == 1:
        return Group()
    return Group(dist.get_rank(), dist.get_world_size(), device)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

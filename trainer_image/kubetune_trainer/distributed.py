"""The process's place in a torchrun group, and the few collectives the recipe needs around
transformers' own DDP: who downloads, who writes, and agreeing to stop.

One process (WORLD_SIZE unset) is a group of one: every call here is then free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 evaluates (generation included) and uploads while the others wait at the next collective.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The one process that writes: checkpoints, progress, the published run."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The one process per node (pod) that downloads into the node's scratch."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(env=os.environ) -> Ranks:
    """Join the group torchrun set up (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    ranks = Ranks(int(env["RANK"]), int(env["LOCAL_RANK"]), world)
    if torch.cuda.is_available():
        # Before the model loads: 4-bit weights go to the current device.
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return ranks


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def any_rank(ranks: Ranks, flag: bool) -> bool:
    """True on every rank if it is true on one (a SIGTERM reaches the pods of a group at different times)."""
    return bool(_all_reduce(ranks, int(flag), dist.ReduceOp.MAX))


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def from_main(ranks: Ranks, value):
    """Rank 0's value on every rank, once every rank got here (a node's own downloads are done)."""
    if not ranks.distributed:
        return value
    dist.barrier()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_local_main(ranks: Ranks, value):
    """The first non-None value the nodes' first processes hold, on every rank, once they all got
    here (each node prepared its own copy of something, the others waited)."""
    if not ranks.distributed:
        return value
    values = [None] * ranks.world_size
    dist.all_gather_object(values, value if ranks.is_local_main else None)
    return next((v for v in values if v is not None), None)


def union_size(ranks: Ranks, items: set) -> int:
    """How many distinct items all ranks hold together."""
    if not ranks.distributed:
        return len(items)
    sets: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(sets, items)
    return len(set().union(*sets))


def total(ranks: Ranks, count: int) -> int:
    return _all_reduce(ranks, count, dist.ReduceOp.SUM)


def sums(ranks: Ranks, values: list[float]) -> list[float]:
    """Each value summed over the ranks, in float64 and one collective."""
    if not ranks.distributed:
        return values
    return _reduced(torch.tensor(values, dtype=torch.float64), dist.ReduceOp.SUM).tolist()


def _all_reduce(ranks: Ranks, value: int, op) -> int:
    """One integer reduced over the ranks: a tensor collective, no pickling (the history sums
    tokens every step)."""
    if not ranks.distributed:
        return value
    return int(_reduced(torch.tensor([value], dtype=torch.int64), op).item())


def _reduced(tensor: torch.Tensor, op) -> torch.Tensor:
    """On the GPU where there is one: NCCL reduces CUDA tensors only."""
    if torch.cuda.is_available():
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(tensor, op=op)
    return tensor.cpu()

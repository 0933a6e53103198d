"""torch.distributed set-up for `torchrun` (gloo on CPU, nccl on GPU) and small helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and logs."""
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce and average gradients in one flat buffer (what DDP does, without its wrapper)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op in one process)."""
    if info.world_size > 1:
        dist.barrier()


def min_over_ranks(value: int, info: DistInfo) -> int:
    """The smallest of each rank's `value` (the value itself in one process)."""
    if info.world_size <= 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def mean_over_ranks(value: float, info: DistInfo) -> float:
    """The mean of each rank's `value` (e.g. the losses of each rank's rows: the full-batch loss)."""
    if info.world_size <= 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size


def gather_objects(world: int, value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order ([value] in a single process)."""
    if world <= 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any) -> Any:
    """Rank 0's picklable `value`, on every rank (every rank must call it)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

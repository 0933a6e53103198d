"""How `build_index` runs under torchrun: rank 0 owns the index folder, every rank embeds a slice.

The process group is joined through `clipforge.distributed`; these helpers only move Python objects
between ranks, so that a step run on rank 0 fails (or succeeds) on every rank and none is left waiting.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from clipforge.distributed import broadcast_object


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): joins the process group under torchrun, (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from clipforge.distributed import init_distributed

    info = init_distributed()
    return info.rank, info.world_size


def on_rank0(rank: int, world: int, step: Callable[[], Any]) -> Any:
    """Run `step` on rank 0 and hand every rank its result; its error is raised on every rank (none hangs)."""
    result: Any = None
    if rank == 0:
        try:
            result = step()
        except Exception as error:
            if world > 1:
                broadcast_object(error)
            raise
    if world <= 1:
        return result
    result = broadcast_object(result)
    if isinstance(result, Exception):
        raise RuntimeError(f"rank 0 failed: {result}")
    return result



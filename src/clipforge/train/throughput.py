"""How close training comes to the machine's limit: the FLOPs of one step, the best matmul rate of a precision
measured in the same process, and the share of that rate a finished run achieved.

    with counting_flops() as counted:
        train_step(pixels, tokens)
    run_utilisation(counted(), steps=700, seconds=170.0, precision="bf16")
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipforge.timing import call_seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Square matmuls from cache-sized to memory-sized: the best of them is the rate a step's matmuls could reach.
PEAK_SIZES = (1024, 2048, 3072)


@contextlib.contextmanager
def counting_flops(enabled: bool = True) -> Iterator[Callable[[], float | None]]:
    """Count the FLOPs (matmuls, convolutions, attention; forward and backward) run inside the block; the yielded
    function returns them in GFLOP after the block (None when not `enabled`: nothing is intercepted then)."""
    if not enabled:
        yield lambda: None
        return
    with FlopCounterMode(display=False) as counter:
        yield lambda: counter.get_total_flops() / 1e9


@functools.lru_cache(maxsize=None)
def best_matmul_gflops(precision: str, repeats: int = 5) -> float:
    """The best GFLOP/s of square matmuls (PEAK_SIZES) in `precision` on the CPU: the fastest call of each size."""
    generator = torch.Generator().manual_seed(0)
    best = 0.0
    for n in PEAK_SIZES:
        a, b = (torch.randn(n, n, generator=generator).to(DTYPES[precision]) for _ in range(2))
        seconds = min(call_seconds(functools.partial(torch.mm, a, b), repeats))
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def run_utilisation(gflop_per_step: float, steps: int, seconds: float, precision: str) -> dict[str, float | str]:
    """A finished run's achieved GFLOP/s (its step's FLOPs x steps over its wall time) against the best matmul rate
    of its precision measured now: {"precision", "gflop_per_step", "achieved_gflops", "best_matmul_gflops",
    "share"}."""
    achieved = gflop_per_step * steps / seconds
    peak = best_matmul_gflops(precision)
    return {"precision": precision, "gflop_per_step": round(gflop_per_step, 2), "achieved_gflops": round(achieved, 1),
            "best_matmul_gflops": round(peak, 1), "share": round(achieved / peak, 3)}

"""Wall-clock timing for benchmarks and the demo: medians, since these machines are noisy."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def call_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall time of each of `repeats` calls of fn() under inference mode, after `warmup` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() under inference mode, after `warmup` untimed calls."""
    return statistics.median(call_seconds(fn, repeats, warmup))

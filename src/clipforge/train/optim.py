"""AdamW and the linear-warmup cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch


def build_optimizer(params: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW over prepared parameter groups, fused (one kernel for all tensors; CPU and CUDA)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, fused=True)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate at `step` (0-based): linear warmup from 0, then cosine decay to `min_lr`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr

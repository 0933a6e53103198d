"""The one weight-decay rule: AdamW decays weight matrices and kernels, never gains, biases or temperatures."""
from __future__ import annotations

from typing import Iterable

import torch


def weight_decay_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                        exclude: tuple[str, ...] = ()) -> list[dict]:
    """[decayed, not decayed] AdamW groups of the trainable parameters: tensors of 2+ dims decay unless their
    name contains one of `exclude`; 0-d and 1-d ones (gains, biases, logit scale and bias) never do."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or any(part in name for part in exclude)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

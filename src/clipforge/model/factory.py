"""Build models from registry names or configs."""
from __future__ import annotations

from typing import Any

import torch

from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, apply_overrides, get_model_config


def create_model(name_or_config: str | CLIPConfig, seed: int | None = None, **overrides: Any) -> CLIP:
    """Randomly initialised CLIP from a registry name (or config).

    Overrides like `embed_dim=256`, `vision__width=128`.
    """
    config = get_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if overrides:
        config = apply_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CLIP(config)
    return CLIP(config)

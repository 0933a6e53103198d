"""Towers compiled for inference, with the compiled graphs cached on disk so a machine pays the compile once.

torch.compile's inductor backend writes what it generates (its FX-graph and AOTAutograd caches) under
TORCHINDUCTOR_CACHE_DIR and looks there first. An entry's key covers what decides the generated code:
the torch build (a hash of torch's own sources, not just its version string), the traced graph (so the
architecture and its config), every input's shape, dtype and strides, and the compiler settings.
Weights are graph inputs: with `freezing` they become constants whose metadata, not values, enter the
key, and the cached code reads the current model's values when it loads. tests/test_compiled.py checks
each of these: a second model of the same architecture hits the cache and still gives its own outputs;
a new shape, architecture or torch build misses.

`freezing` is what lets inductor pre-pack the linear weights for oneDNN and fuse the elementwise work
(QuickGELU, bias, residual adds) into the surrounding kernels; it applies under `torch.no_grad()` /
`torch.inference_mode()`, which is how inference runs.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from clipforge.io import cache_root

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
OPTIONS = {"freezing": True}


def default_compile_cache() -> Path:
    """$CLIPFORGE_CACHE/compiled or ~/.cache/clipforge/compiled (kept across reboots, unlike inductor's /tmp)."""
    return cache_root() / "compiled"


def use_compile_cache(cache_dir: str | Path | None = None) -> Path:
    """Point inductor's on-disk caches at `cache_dir`; without one, keep the user's TORCHINDUCTOR_CACHE_DIR,
    else use `default_compile_cache()`. Process-wide: inductor reads the variable for every compile."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or default_compile_cache()
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(path)
    return path


def compile_tower(module: nn.Module, dynamic: bool | None = None) -> None:
    """torch.compile `module` in place for inference (frozen weights, fused epilogues)."""
    module.compile(dynamic=dynamic, options=dict(OPTIONS))

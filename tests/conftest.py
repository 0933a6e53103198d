"""Shared test helpers: fixture location and tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The shared fixtures are bare OpenAI-layout state dicts: OpenAI's 64-wide heads and QuickGELU (their README).
OPENAI = {"head_width": 64, "quick_gelu": True}
OPENAI_FLAGS = ("--head-width", "64", "--quick-gelu")
FIXTURES = Path(os.environ.get("CLIPFORGE_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "openai-vit-tiny").is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set CLIPFORGE_FIXTURES)")
    return FIXTURES


def random_tokens(batch: int, length: int, lengths: list[int], vocab: int = 49408, seed: int = 0) -> torch.Tensor:
    """SOT + random ids + EOT (the highest id) + zero padding, one row per entry of `lengths`."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, 0] = vocab - 2
        tokens[row, 1 : n + 1] = torch.randint(1, vocab - 2, (n,), generator=gen)
        tokens[row, n + 1] = vocab - 1
    return tokens


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add noise to every parameter and float buffer so a wrong weight mapping cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.add_(scale * torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype))
    return module


class _Unused(type):
    """A stand-in for every torchvision name open_clip imports: any attribute is the class itself."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


@pytest.fixture
def open_clip_package():
    """The real open_clip package (factory, model code), imported with torchvision's names stubbed.

    open_clip_torch is installed --no-deps (scripts/setup.sh) and imports torchvision for its image
    transforms; `create_model` never calls them (preprocessing is clipforge's, checked elsewhere), so each
    torchvision name it imports is a placeholder class here. Everything imported is dropped afterwards.
    """
    import importlib
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (scripts/setup.sh installs it --no-deps)")
    import transformers  # noqa: F401  (open_clip imports it; it must not see the stub below)

    before = set(sys.modules)
    if importlib.util.find_spec("torchvision") is None:
        placeholder = _Unused("Placeholder", (), {"__init__": lambda self, *a, **k: None})
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                     "torchvision.transforms.functional"):
            module = types.ModuleType(name)
            module.__getattr__ = lambda attr: placeholder if not attr.startswith("__") else _missing(attr)
            sys.modules[name] = module
    try:
        yield importlib.import_module("open_clip")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


def _missing(name: str) -> None:
    raise AttributeError(name)

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


@pytest.fixture
def open_clip_model_code():
    """open_clip's `model` module (its CLIP class), loaded without its package __init__.

    open_clip_torch is installed --no-deps (scripts/setup.sh): its __init__ imports torchvision for
    preprocessing, which model code never touches, so only the one torchvision name its utils import
    (FrozenBatchNorm2d, used to freeze batch norms in training) is stubbed.
    """
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (scripts/setup.sh installs it --no-deps)")
    import transformers  # noqa: F401  (open_clip's hf_model imports it; it must not see the stub below)

    before = set(sys.modules)
    if importlib.util.find_spec("torchvision") is None:
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
        sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                            "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc})
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = package
    try:
        yield importlib.import_module("open_clip.model")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]

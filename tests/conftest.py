"""Shared test helpers: reference fixtures, tiny models, the open_clip reference package.

Reference fixtures (tests/golden.py): the `golden` tests take `reference`, parametrised over the in-repo
cut of the reference fixtures (tests/fixtures/golden/, always there) and, as extra cases, every model of
the shared fixtures when they are found (CLIPFORGE_SHARED_FIXTURES, default ../shared/fixtures; set it
to `none` to leave them out). Tests that only need an OpenAI-layout checkpoint and its images take
`fixtures_dir`: the in-repo cut, rebuilt in the shared layout.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import golden

REPO = Path(__file__).resolve().parents[1]
# The reference fixtures are bare OpenAI-layout state dicts: OpenAI's 64-wide heads and QuickGELU (their README).
OPENAI = {"head_width": 64, "quick_gelu": True}
OPENAI_FLAGS = ("--head-width", "64", "--quick-gelu")


def reference_cases() -> list[tuple[str, str]]:
    """(source, model name) of every reference model: the in-repo ones, then the shared ones if found."""
    cases = [("repo", name) for name in golden.golden_names()]
    shared = golden.shared_root()
    if shared is not None:
        cases += [("shared", name) for name in golden.model_names(shared)]
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "reference" in metafunc.fixturenames:
        cases = reference_cases()
        metafunc.parametrize("reference", cases, ids=[f"{s}-{n}" for s, n in cases], indirect=True)


def pytest_report_header(config: pytest.Config) -> str:
    shared = golden.shared_root()
    extra = f"and shared {shared}" if shared else f"only (no shared fixtures; {golden.SHARED_ENV}=<dir> adds them)"
    return f"reference fixtures: in-repo {golden.GOLDEN.relative_to(REPO)} {extra}"


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    """The in-repo reference models rebuilt in the shared layout: <dir>/openai-vit-tiny/openai_state_dict.*"""
    root = tmp_path_factory.mktemp("golden")
    for name in golden.golden_names():
        golden.materialise(name, root)
    return root


@pytest.fixture
def reference(request, fixtures_dir) -> golden.Reference:
    """One reference model folder with its recorded outputs (parametrised by pytest_generate_tests)."""
    source, name = request.param
    root = fixtures_dir if source == "repo" else golden.shared_root()
    return golden.Reference(source, name, root / name)


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

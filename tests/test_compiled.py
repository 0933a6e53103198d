"""Compiled towers: equal to eager within rounding, and the on-disk graph cache is reused only when it may be."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import clipforge
from clipforge.model import compiled

pytestmark = pytest.mark.slow  # each compile runs inductor's C++ toolchain: seconds, not milliseconds


def compile_and_run(model: clipforge.CLIP, pixels: torch.Tensor) -> tuple[int, int]:
    """(cache hits, cache misses) of a fresh compile in this process; its features must equal eager's."""
    with torch.inference_mode():
        want = model.encode_image(pixels)
    torch._dynamo.reset()  # forget in-memory compiled code: only the disk cache can save a compile
    counters.clear()
    model.compile_for_inference()
    with torch.inference_mode():
        got = model.encode_image(pixels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def tiny(seed: int, layers: int = 2) -> clipforge.CLIP:
    config = clipforge.get_model_config("cpu-vit-tiny-32")
    config.vision.layers = layers
    torch.manual_seed(seed)
    return clipforge.CLIP(config).eval()


def test_compiled_cache_hits_only_for_the_same_torch_architecture_and_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "cache"))
    pixels = torch.randn(2, 3, 32, 32)
    hits, misses = compile_and_run(tiny(seed=0), pixels)
    assert misses >= 1 and hits == 0
    assert any((tmp_path / "cache").rglob("*")), "nothing was written to the cache folder"
    # Same architecture, other weights: the cached code is reused, and gives this model's own features.
    hits, misses = compile_and_run(tiny(seed=1), pixels)
    assert hits >= 1 and misses == 0
    assert compile_and_run(tiny(seed=1), torch.randn(3, 3, 32, 32))[1] >= 1  # a new batch size
    assert compile_and_run(tiny(seed=1, layers=3), pixels)[1] >= 1  # another architecture
    monkeypatch.setattr("torch._inductor.codecache.torch_key", lambda: b"another torch build")
    assert compile_and_run(tiny(seed=1), pixels)[1] >= 1  # another torch


def test_default_cache_folder_follows_clipforge_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(compiled.CACHE_ENV, raising=False)
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    assert compiled.use_compile_cache() == tmp_path / "compiled"
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "mine"))
    assert compiled.use_compile_cache() == tmp_path / "mine"  # the user's own setting wins

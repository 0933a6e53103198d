"""The decoded-image cache: same pixels as the PIL path, reuse and invalidation, skips, exact resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data.decoded import (
    AugmentDraw,
    DecodedCaptionDataset,
    TensorTrainTransform,
    build_decoded_cache,
    stored_size_for,
)
from clipforge.data.transforms import EvalTransform
from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train
from synthetic import make_caption_set
from test_data import byte_tokenizer
from test_images import mode_corpus


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_caption_set(root, per_concept=4, seed=0)
    return root


@pytest.mark.parametrize("composite_white", [False, True])
def test_without_augmentation_the_pixels_equal_the_pil_path(tmp_path, composite_white):
    paths = []
    for mode, image in mode_corpus().items():
        paths.append(tmp_path / f"{mode.replace(';', '_')}.{'tiff' if mode in ('I', 'F') else 'png'}")
        image.save(paths[-1])
    decoded = build_decoded_cache([str(p) for p in paths], 24, composite_white, cache_dir=tmp_path / "cache",
                                  workers=1, progress=False)
    plain = TensorTrainTransform(24)
    for i, path in enumerate(paths):
        assert torch.equal(plain(decoded.pixels[i], None), EvalTransform(24, composite_white)(path)), path.name


def test_cache_is_reused_and_rebuilt_when_a_source_changes(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (30, 20), (40 * i, 90, 10)).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths.append(str(tmp_path / "broken.png"))
    first = build_decoded_cache(paths, 16, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert first.failed == {3: ("corrupt_image", first.failed[3][1])}
    stamp = os.stat(first.folder / "pixels.u8").st_mtime_ns
    again = build_decoded_cache(paths, 16, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert again.folder == first.folder and os.stat(again.folder / "pixels.u8").st_mtime_ns == stamp
    Image.new("RGB", (30, 20), (255, 255, 255)).save(paths[0])
    os.utime(paths[0], ns=(stamp + 10**9, stamp + 10**9))  # a new mtime even on a coarse clock
    changed = build_decoded_cache(paths, 16, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert changed.folder != first.folder and changed.pixels[0].min() == 255
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_dataset_skips_what_failed_and_draws_like_the_pil_path(shapes, tmp_path):
    lines = (shapes / "train.csv").read_text().splitlines()
    (shapes / "broken.png").write_bytes(b"")
    (shapes / "with_broken.csv").write_text("\n".join(lines[:9] + ["broken.png,a void,x"]) + "\n")
    transform = TensorTrainTransform(32, scale=(0.5, 1.0), color_jitter=0.3, grayscale_prob=0.5)
    dataset = DecodedCaptionDataset(shapes / "with_broken.csv", transform, byte_tokenizer, stored_size=40,
                                    cache_dir=tmp_path / "cache", progress=False)
    assert dataset[(0, 8)].reason == "empty_file"
    a, b, c = (dataset.collate([dataset[item]]) for item in ((0, 3), (0, 3), (1, 3)))
    assert torch.equal(a["pixels"], b["pixels"]) and not torch.equal(a["pixels"], c["pixels"])
    assert a["pixels"].shape == (1, 3, 32, 32) and dataset[(0, 3)]["caption"] in dataset.captions[3]
    batch = dataset.collate([dataset[(0, i)] for i in range(9)])
    assert batch["skipped"] == {"empty_file": 1} and len(batch["pixels"]) == 8
    # A batch is the samples one by one: per-sample draws, batched arithmetic.
    assert (batch["pixels"][3] - a["pixels"][0]).abs().max() < 1e-5


def test_full_crop_without_jitter_is_the_stored_square_resized():
    stored = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    transform = TensorTrainTransform(32)
    draws = [AugmentDraw(0, 0, 32, 32)] * 2
    assert (transform.apply(stored, draws) - transform.apply(stored, None)).abs().max() < 1e-5


def test_stored_size_leaves_a_crop_margin():
    assert stored_size_for(32, 1.0) == 32
    assert stored_size_for(32, 0.9) == 34 and stored_size_for(224, 0.5) == 318


def test_training_with_the_cache_resumes_exactly(shapes, tmp_path):
    def config(out, **extra):
        return TrainConfig(model="cpu-vit-tiny-32", train_data=str(shapes / "train.csv"), batch_size=16, workers=0,
                           output_dir=str(out), warmup=2, lr=1e-3, seed=0, decoded_cache=True,
                           decoded_cache_dir=str(tmp_path / "cache"), aug_color_jitter=0.2, steps=8, **extra)

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    train(config(tmp_path / "straight"))
    train(config(tmp_path / "split", max_steps_this_run=5))
    train(config(tmp_path / "split", resume="latest"))
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 9))
    assert all(abs(straight[s] - split[s]) <= 1e-6 for s in range(6, 9))
    pil = train(TrainConfig(model="cpu-vit-tiny-32", train_data=str(shapes / "train.csv"), batch_size=16, workers=0,
                            output_dir=str(tmp_path / "pil"), warmup=2, lr=1e-3, seed=0, steps=8,
                            aug_color_jitter=0.2))
    assert pil["final_loss"] != straight[8]  # the cache really was used (tensor, not PIL, augmentation)

"""Pillow preprocessing: fixture pixels exactly, train crops, transparency handling, bad files."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    TrainTransform,
    center_crop,
    composite_on_white,
)


@pytest.mark.golden
def test_eval_transform_matches_reference_pixels(reference):
    expected = reference.expected()["pixels"]
    transform = EvalTransform(reference.image_size)
    assert len(reference.images) == len(expected) == 4
    for i, image in enumerate(reference.images):
        assert (transform(image) - expected[i]).abs().max() <= 1e-6, image.name


def test_eval_transform_resizes_a_small_image_up_so_nothing_is_padded():
    # The short side is resized to 64 first (10x200 -> 64x1280), so the crop never needs padding: a white
    # image stays white everywhere (padding would show as black bands).
    out = EvalTransform(64)(Image.new("RGB", (10, 200), "white"))
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert out.shape == (3, 64, 64) and torch.allclose(out, white.view(3, 1, 1).expand(3, 64, 64), atol=1e-6)


def test_center_crop_pads_a_smaller_image_with_black_centred():
    # 10 wide, 20 high, cropped to 16: padded to 16 x 20 (3 black columns left, 3 right), then rows 2..17.
    image = Image.new("RGB", (10, 20), (200, 100, 50))
    image.putpixel((0, 2), (1, 2, 3))  # marks where the top-left of the crop must land
    out = np.asarray(center_crop(image, 16))
    want = np.zeros((16, 16, 3), np.uint8)
    want[:, 3:13] = (200, 100, 50)
    want[0, 3] = (1, 2, 3)
    assert out.shape == (16, 16, 3) and np.array_equal(out, want)
    odd = np.asarray(center_crop(Image.new("L", (5, 5), 255), 8))  # odd padding: the extra column goes right
    assert np.array_equal(odd, np.pad(np.full((5, 5), 255, np.uint8), ((1, 2), (1, 2))))


def test_train_transform_shape_and_determinism():
    image = Image.new("RGB", (120, 80), "red")
    transform = TrainTransform(48)
    a = transform(image, random.Random(3))
    b = transform(image, random.Random(3))
    assert a.shape == (3, 48, 48) and torch.equal(a, b)
    boxes = {transform.crop_box((100, 100), random.Random(s)) for s in range(20)}
    assert len(boxes) > 1
    for left, top, w, h in boxes:  # scale 0.9-1.0 of the area, inside the image
        assert 0.85 * 100 * 100 <= w * h <= 1.01 * 100 * 100 and left + w <= 100 and top + h <= 100
    # 3:2 admits no 0.9-area crop within ratio 4:3, so torchvision's fallback: the largest 4:3 center crop.
    assert transform.crop_box((120, 80), random.Random(0)) == (6, 0, 107, 80)


def test_composite_on_white_vs_clip_convert():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert composite_on_white(transparent).getpixel((0, 0)) == (255, 255, 255)
    assert transparent.convert("RGB").getpixel((0, 0)) == (255, 0, 0)  # CLIP's default keeps the colour
    white = EvalTransform(8, composite_white=True)(transparent)
    plain = EvalTransform(8)(transparent)
    assert not torch.equal(white, plain)
    half = Image.new("LA", (4, 4), (0, 128))
    assert composite_on_white(half).getpixel((0, 0))[0] in (127, 128)


def test_unreadable_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        EvalTransform(32)(bad)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        EvalTransform(32)(tmp_path / "nope.png")


def test_colour_augmentation_is_deterministic_per_rng_and_changes_pixels():
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    plain = TrainTransform(32)(image, random.Random(1))
    jitter = TrainTransform(32, color_jitter=0.4, grayscale_prob=1.0)
    a, b = jitter(image, random.Random(1)), jitter(image, random.Random(1))
    assert torch.equal(a, b) and not torch.equal(a, plain)
    gray = a * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1) + torch.tensor(
        [0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    assert (gray[0] - gray[1]).abs().max() < 1e-5  # grayscale: equal channels

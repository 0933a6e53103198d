"""CLIP image preprocessing with Pillow only (no torchvision), bit-compatible with OpenAI's transform."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from clipforge.data.images import composite_on_white, load_image, to_rgb
from clipforge.model.config import CLIP_MEAN, CLIP_STD, PreprocessConfig


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side equals `size` (torchvision's size rounding)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Center crop to size x size, padding with black first if the image is smaller (torchvision rules)."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def eval_geometry(image: Image.Image, size: int, composite_white: bool = False, resize: str = "crop",
                  interpolation: str = "bicubic") -> Image.Image:
    """The RGB size x size square the eval transform normalises: short-side bicubic resize and center crop, or
    (`resize="squash"`, SigLIP) one resize of the whole image to the square (bicubic, or bilinear: SigLIP 2)."""
    if composite_white:  # transformers' order: RGB first, then resize
        image = composite_on_white(image)
    if resize == "squash":  # transformers' SiglipImageProcessor: RGB, then one bicubic resize to (size, size)
        return to_rgb(image).resize((size, size), Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC)
    # OpenAI's order: resize and crop in the file's mode, RGB last (a P image resizes by nearest).
    return to_rgb(center_crop(resize_short_side(image, size), size))


def to_tensor(image: Image.Image, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """[3, H, W] float tensor: /255 then (x - mean) / std, in the same fp32 order as torchvision."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return array.sub_(mean_t).div_(std_t)


@dataclass
class EvalTransform:
    """Resize the short side (bicubic), center crop, RGB, normalise: OpenAI's eval preprocessing."""

    image_size: int = 224
    composite_white: bool = False  # blend transparency on white instead of CLIP's convert("RGB")
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: str = "crop"  # "crop" (CLIP) or "squash" (SigLIP: the whole image to the square, no crop)
    interpolation: str = "bicubic"  # the squash's filter ("bilinear": SigLIP 2's processor)

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        image = eval_geometry(load_image(image), self.image_size, self.composite_white, self.resize,
                              self.interpolation)
        return to_tensor(image, self.mean, self.std)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "EvalTransform":
        """The eval transform a model's checkpoint prescribes (its size and `preprocess_config`)."""
        config = getattr(model, "preprocess_config", None) or PreprocessConfig()
        return cls(model.image_size, config.composite_white, config.mean, config.std, config.resize,
                   config.interpolation)


@dataclass
class TrainTransform:
    """Random resized crop (scale 0.9-1.0, bicubic) then the eval normalisation, as open_clip trains.

    Optional colour augmentation (off by default): brightness/contrast/saturation jitter of strength
    `color_jitter` and grayscale with probability `grayscale_prob`, drawn from the same `rng`.
    """

    image_size: int = 224
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    composite_white: bool = False
    color_jitter: float = 0.0
    grayscale_prob: float = 0.0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image: Image.Image | str | Path, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random
        image = to_rgb(load_image(image), self.composite_white)
        left, top, width, height = self.crop_box(image.size, rng)
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC,
                             box=(left, top, left + width, top + height))
        if self.color_jitter > 0:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhance(image).enhance(rng.uniform(1 - self.color_jitter, 1 + self.color_jitter))
        if self.grayscale_prob > 0 and rng.random() < self.grayscale_prob:
            image = image.convert("L").convert("RGB")
        return to_tensor(image, self.mean, self.std)

    def crop_box(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, width, height) drawn as torchvision's RandomResizedCrop does."""
        width, height = size
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, width - w), rng.randint(0, height - h), w, h
        # Fallback: the largest center crop within the ratio bounds.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h


def image_transform(
    image_size: int, train: bool = False, composite_white: bool = False
) -> EvalTransform | TrainTransform:
    """The eval or train transform for a model's input size."""
    kind = TrainTransform if train else EvalTransform
    return kind(image_size=image_size, composite_white=composite_white)

"""SigLIP 2's NaFlex input: each image resized to the patch grid that keeps its aspect ratio within a patch budget,
cut into patch rows, padded to the budget with a mask (transformers' Siglip2ImageProcessor, reproduced).

    transform = NaFlexTransform.for_model(model, max_patches=256)
    patches, mask, grids = transform.batch(["cat.jpg", "panorama.png"])
    features = model.encode_image_patches(patches, mask, grids, normalize=True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from clipforge.data.images import composite_on_white, load_image, to_rgb
from clipforge.data.transforms import to_tensor
from clipforge.errors import ConfigError


def naflex_size(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(height, width) in pixels, multiples of the patch size, for an image of this size: the largest scale whose
    grid fits `max_patches`, found by the same bisection (bounds and tolerance) as transformers, so sizes agree."""

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    def fits(scale: float) -> bool:
        return (side(scale, height) // patch_size) * (side(scale, width) // patch_size) <= max_patches

    tolerance = 1e-5
    low, high = tolerance / 10, 100.0
    while high - low >= tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return side(low, height), side(low, width)


def patch_rows(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[3, H, W] -> [H/p * W/p, p*p*3]: row-major grid cells, each flattened with its channels last."""
    channels, height, width = pixels.shape
    grid = pixels.reshape(channels, height // patch_size, patch_size, width // patch_size, patch_size)
    return grid.permute(1, 3, 2, 4, 0).reshape(-1, patch_size * patch_size * channels)


@dataclass
class NaFlexTransform:
    """One image -> (patch rows [max_patches, p*p*3], mask [max_patches], grid (rows, cols))."""

    patch_size: int = 16
    max_patches: int = 256
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"  # Siglip2ImageProcessor's default filter
    composite_white: bool = False

    def __call__(self, image: Image.Image | str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = load_image(image)
        image = to_rgb(composite_on_white(image) if self.composite_white else image)
        height, width = naflex_size(image.height, image.width, self.patch_size, self.max_patches)
        filter_ = Image.BILINEAR if self.interpolation == "bilinear" else Image.BICUBIC
        rows = patch_rows(to_tensor(image.resize((width, height), filter_), self.mean, self.std), self.patch_size)
        patches = rows.new_zeros(self.max_patches, rows.shape[1])
        patches[: len(rows)] = rows
        mask = torch.zeros(self.max_patches, dtype=torch.long)
        mask[: len(rows)] = 1
        return patches, mask, torch.tensor([height // self.patch_size, width // self.patch_size])

    def batch(self, images: Sequence[Image.Image | str | Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked (patches [B, N, p*p*3], mask [B, N], grids [B, 2]) for `CLIP.encode_image_patches`."""
        patches, masks, grids = zip(*(self(image) for image in images))
        return torch.stack(patches), torch.stack(masks), torch.stack(grids)

    @classmethod
    def for_model(cls, model: torch.nn.Module, max_patches: int | None = None) -> "NaFlexTransform":
        """The NaFlex transform of a NaFlex (SigLIP 2) model: its patch size and normalisation; the patch budget
        defaults to its native grid (image_size / patch_size squared)."""
        vision = model.config.vision
        if not vision.naflex:
            raise ConfigError("NaFlex input needs a NaFlex image tower (SigLIP 2's, vision.naflex)")
        config = model.preprocess_config
        budget = max_patches or (vision.image_size // vision.patch_size) ** 2
        return cls(vision.patch_size, budget, config.mean, config.std, config.interpolation, config.composite_white)

"""What an HF transformers folder holds besides its config: its weight files and its image processor's settings."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint.weights import read_weights
from clipforge.errors import CheckpointError
from clipforge.model.config import PreprocessConfig, VisionConfig


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of an HF folder under transformers' names (one file, or the shards its index lists)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_weights(directory / shard).items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_weights(directory / name)
    raise CheckpointError(f"{directory}: HF directory has config.json but no model.safetensors or pytorch_model.bin")


def hf_preprocess(directory: Path, vision: VisionConfig) -> PreprocessConfig:
    """transformers' image processor settings: CLIPImageProcessor's (composite on white with `do_convert_rgb`, its
    mean and std), or SigLIP's; a folder without the file gets its model family's defaults."""
    path = directory / "preprocessor_config.json"
    pp = json.loads(path.read_text()) if path.is_file() else {}
    image_size = vision.image_size
    family = ("Siglip2ImageProcessor" if vision.naflex else "SiglipImageProcessor") if vision.pool == "map" else ""
    pp.setdefault("image_processor_type", family)
    if "Siglip" in pp["image_processor_type"]:
        return _siglip_preprocess(path, pp, image_size)
    size = pp.get("size", image_size)
    if isinstance(size, dict):  # {"shortest_edge": N}, or a bare N in older files (openai/clip-vit-base-patch32)
        size = size.get("shortest_edge", image_size)
    crop = pp.get("crop_size", image_size)
    if isinstance(crop, dict):
        crop = crop.get("height", image_size)
    if pp.get("resample", 3) != 3 or size != image_size or crop != image_size or not pp.get("do_center_crop", True):
        raise CheckpointError(f"{path}: resize to {size}, crop {crop}, resample {pp.get('resample')} differ from "
                              f"CLIP's bicubic {image_size} px resize + crop, which is all clipforge implements")
    default = PreprocessConfig()
    return PreprocessConfig(composite_white=bool(pp.get("do_convert_rgb", True)),
                            mean=tuple(pp.get("image_mean", default.mean)), std=tuple(pp.get("image_std", default.std)))


def _siglip_preprocess(path: Path, pp: dict[str, Any], image_size: int) -> PreprocessConfig:
    """SiglipImageProcessor: one bicubic resize of the whole image to the square input, then its mean and std.
    Siglip2ImageProcessor (NaFlex) keeps each image's aspect ratio; clipforge's fixed-size input is the model's
    native square (its position grid), resized with the processor's filter (bilinear unless it says bicubic)."""
    naflex = pp.get("image_processor_type", "").startswith("Siglip2")
    size = pp.get("size", {"height": image_size, "width": image_size})
    resample = pp.get("resample", 2 if naflex else 3)
    if (resample not in (2, 3) or not pp.get("do_resize", True) or
            (not naflex and (size.get("height"), size.get("width")) != (image_size, image_size))):
        raise CheckpointError(f"{path}: resize to {size}, resample {resample} differ from SigLIP's bicubic (or "
                              f"bilinear) {image_size}x{image_size} px resize, which is what clipforge implements")
    if not pp.get("do_normalize", True) or pp.get("rescale_factor", 1 / 255) != 1 / 255:
        raise CheckpointError(f"{path}: clipforge implements rescale by 1/255 and normalisation, as SigLIP ships")
    return PreprocessConfig(composite_white=bool(pp.get("do_convert_rgb")),
                            mean=tuple(pp.get("image_mean", (0.5,) * 3)), std=tuple(pp.get("image_std", (0.5,) * 3)),
                            resize="squash", interpolation="bilinear" if resample == 2 else "bicubic")

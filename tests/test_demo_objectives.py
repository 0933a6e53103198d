"""The objective comparison's arithmetic: images CLIP needs to reach an accuracy, and the caption models' shapes."""
from __future__ import annotations

import pytest

import clipforge
from clipforge.demo.objectives import decoder_overrides, images_to_reach


def _curve(points: list[tuple[int, float]]) -> list[dict[str, float]]:
    return [{"images": x, "top1": y} for x, y in points]


def test_images_to_reach_interpolates_between_checkpoints_from_chance():
    curve = _curve([(100, 0.2), (200, 0.4), (300, 0.5)])
    assert images_to_reach(curve, 0.3, chance=0.1) == pytest.approx(150)  # halfway between 0.2 at 100 and 0.4 at 200
    assert images_to_reach(curve, 0.15, chance=0.1) == pytest.approx(50)  # between chance at 0 and the first checkpoint
    assert images_to_reach(curve, 0.6, chance=0.1) is None  # never reached
    assert images_to_reach(curve, 0.05, chance=0.1) == 0  # below chance: reached before any image
    dip = _curve([(100, 0.3), (200, 0.2), (300, 0.35)])
    assert images_to_reach(dip, 0.32, chance=0.0) == pytest.approx(280)  # the first rise past it


def test_the_caption_models_split_the_demo_text_tower_as_coca_does():
    model = clipforge.create_model("demo-rn-32", **decoder_overrides("demo-rn-32"))
    assert model.config.text.layers + model.config.decoder.layers == 2  # the demo CLIP's text depth
    assert model.config.embed_dim == model.config.text.width == model.config.decoder.width

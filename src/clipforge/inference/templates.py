"""Prompt templates and ImageNet class names for zero-shot classification (package data, no open_clip)."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from clipforge.errors import EvaluationError

# "simple" is the CLIP paper's single default prompt; "openai_7" is the notebook's best 7-template subset
# (what open_clip calls SIMPLE_IMAGENET_TEMPLATES). "siglip" is the prompt transformers' SigLIP documentation gives
# for reproducing its zero-shot pipeline (SigLIP's own ImageNet numbers average the CLIP paper's 80: openai_80).
_FILES = {"openai_80": "imagenet.json", "openai_7": "imagenet.json", "emoji": "templates.json",
          "tuxpaint": "templates.json"}
_INLINE = {"simple": ["a photo of a {}."], "label": ["{}"], "siglip": ["This is a photo of {}."]}


@lru_cache(maxsize=None)
def _load(filename: str) -> dict[str, Any]:
    return json.loads(resources.files("clipforge.inference").joinpath("data", filename).read_text("utf-8"))


def list_templates() -> list[str]:
    """Names accepted by `get_templates`."""
    return sorted([*_FILES, *_INLINE])


def get_templates(name: str) -> list[str]:
    """Prompt templates ("{}" marks the class name) by set name: openai_80, openai_7, simple, siglip, emoji,
    tuxpaint, label."""
    if name in _INLINE:
        return list(_INLINE[name])
    if name not in _FILES:
        raise EvaluationError(f"unknown template set {name!r}; choose from {list_templates()}")
    return list(_load(_FILES[name])[name])


def imagenet_classnames() -> list[str]:
    """OpenAI's 1,000 cleaned ImageNet class names, in class-index order (from the CLIP notebook, MIT)."""
    return list(_load("imagenet.json")["classnames"])

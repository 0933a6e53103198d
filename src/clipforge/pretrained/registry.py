"""Pretrained weights by name: open_clip's (architecture, tag) pairs for the architectures clipforge has."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from clipforge.errors import CheckpointError

TAGS_FILE = Path(__file__).with_name("tags.json")  # scripts/gen_pretrained_tags.py writes it


@dataclass(frozen=True)
class PretrainedTag:
    """Where one set of weights lives and how it is run."""

    name: str  # the architecture name users give with the tag (open_clip's)
    tag: str
    architecture: str  # clipforge's registry architecture the weights need ("-quickgelu" for QuickGELU weights)
    hf_hub: str  # Hugging Face hub repo with open_clip's files
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    url: str = ""  # OpenAI's own release URL (preferred: a published sha256 to check against)
    sha256: str = ""
    unsupported: str = ""  # why clipforge cannot run these weights exactly ("" when it can)
    resize: str = "crop"  # "squash" for SigLIP's whole-image resize (PreprocessConfig.resize)


@lru_cache(maxsize=1)
def _table() -> dict[tuple[str, str], PretrainedTag]:
    records = json.loads(TAGS_FILE.read_text())["tags"]
    return {(r["name"], r["tag"]): PretrainedTag(**{**r, "mean": tuple(r["mean"]), "std": tuple(r["std"])})
            for r in records}


def list_pretrained(name: str | None = None) -> list[tuple[str, str]]:
    """(architecture, tag) pairs with downloadable weights clipforge runs exactly (of `name` only, if given)."""
    return [key for key, entry in _table().items() if not entry.unsupported and (name is None or key[0] == name)]


def get_pretrained(name: str, tag: str) -> PretrainedTag:
    """The entry of (name, tag); an unknown pair or unsupported weights are refused with what exists."""
    entry = _table().get((name, tag))
    if entry is None:
        tags = sorted(t for n, t in _table() if n == name)
        known = (f"its tags: {', '.join(tags)}" if tags
                 else "no pretrained weights are listed for it (clipforge.list_pretrained() lists them)")
        raise CheckpointError(f"no pretrained weights {tag!r} for {name!r}; {known}")
    if entry.unsupported:
        raise CheckpointError(f"{name} {tag!r}: {entry.unsupported}; loading them would give different features")
    return entry

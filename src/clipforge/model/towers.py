"""The text towers by name (CLIPConfig.text_tower) and the one function that picks a model's tokenizer."""
from __future__ import annotations

from pathlib import Path

from clipforge.errors import ConfigError
from clipforge.model.config import CLIPConfig
from clipforge.model.minilm import MiniLMTextTower
from clipforge.model.text_tower import CausalTextTower, TextTower
from clipforge.text.base import Tokenizer

TEXT_TOWERS: dict[str, type[TextTower]] = {tower.kind: tower for tower in (CausalTextTower, MiniLMTextTower)}


def text_tower_class(name: str) -> type[TextTower]:
    """The TextTower subclass registered under `name`."""
    if name not in TEXT_TOWERS:
        raise ConfigError(f"unknown text tower {name!r}: use one of {', '.join(TEXT_TOWERS)}")
    return TEXT_TOWERS[name]


def tokenizer_for(config: CLIPConfig, directory: str | Path | None = None,
                  context_length: int | None = None) -> Tokenizer:
    """The tokenizer of a model with this config: the files its checkpoint folder carries, else its tower's default."""
    folder = Path(directory) if directory is not None and Path(directory).is_dir() else None
    return text_tower_class(config.text_tower).tokenizer(config.text, folder, context_length)

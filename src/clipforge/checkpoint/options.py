"""The caller's choice of how to read a checkpoint, shared by `load`, `get_tokenizer` and the CLI's model flags."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from clipforge.errors import ConfigError
from clipforge.model.config import CLIPConfig


@dataclass(frozen=True)
class LoadOptions:
    """What a checkpoint may not say about itself, as the caller states it (None: the checkpoint decides).

    pretrained: weights for a registry architecture: a tag of `list_pretrained()`, or a weights file.
    config: the architecture of the weights: a registry name, an open_clip_config.json, clipforge.json or HF
        config.json path, or a CLIPConfig (default: the config inside the folder or beside the weights file).
    head_width: attention head width of a bare OpenAI-layout state dict (OpenAI's releases: 64).
    quick_gelu: a bare state dict was trained with QuickGELU (True, every OpenAI release) or exact GELU (False).
    """

    pretrained: str | None = None
    config: str | Path | CLIPConfig | None = None
    head_width: int | None = None
    quick_gelu: bool | None = None

    def __post_init__(self) -> None:
        # bool is an int: head_width=True would silently mean 1-wide heads.
        if self.head_width is not None and (isinstance(self.head_width, bool) or not isinstance(self.head_width, int)):
            raise ConfigError(f"head_width must be an int (OpenAI's releases: 64), got {self.head_width!r}")
        if self.quick_gelu is not None and not isinstance(self.quick_gelu, bool):
            raise ConfigError(f"quick_gelu must be True, False or None, got {self.quick_gelu!r}")


def merge_options(options: LoadOptions | None, pretrained: str | None = None,
                  config: str | Path | CLIPConfig | None = None, head_width: int | None = None,
                  quick_gelu: bool | None = None) -> LoadOptions:
    """`options`, or LoadOptions from the keyword arguments `load` has always taken; refuses both at once."""
    keywords = LoadOptions(pretrained, config, head_width, quick_gelu)
    if options is None:
        return keywords
    given = [f.name for f in fields(keywords) if getattr(keywords, f.name) is not None]
    if given:
        raise ConfigError(f"pass {', '.join(given)} inside options=LoadOptions(...) or as keywords, not both")
    return options

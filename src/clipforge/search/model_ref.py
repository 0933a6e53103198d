"""Which model an index was built with: how it is recorded, and the one check that `index` and `search` share.

Embeddings of two models are not comparable, even at the same size: a query embedded by another model
ranks the index's images at random. So `clipforge index` refuses to update an index with another model
and `clipforge search --model` refuses to query it with one, both through `check_model`. A checkpoint with the
index model's image tower, bit for bit (the CLIP with towers bound to it by `clipforge bind`), embeds into the same
space and is taken: an index built before a binding serves the bound model's audio or second-language queries.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

from clipforge.errors import SearchError


class ModelRef(NamedTuple):
    """A model as an index records it: `name` (an absolute checkpoint path, hf-hub: name or registry name)
    and `pretrained` (a weights tag, an absolute weights file, or None)."""

    name: str
    pretrained: str | None = None

    @classmethod
    def of(cls, model: str | Path, pretrained: str | None = None) -> "ModelRef":
        """How `model` and `pretrained`, as given to `clipforge.load`, are recorded: existing paths made absolute."""
        path = Path(model)
        name = str(path.resolve()) if path.exists() else str(model)
        if pretrained is not None and Path(pretrained).is_file():  # a tag is never taken for a folder of its name
            pretrained = str(Path(pretrained).resolve())
        return cls(name, pretrained)

    def __str__(self) -> str:
        return self.name + (f" (pretrained {self.pretrained})" if self.pretrained else "")

    def missing_files(self) -> list[str]:
        """The recorded checkpoint paths that no longer exist (the checkpoint moved or was deleted)."""
        return [value for value in self if value is not None and Path(value).is_absolute() and not Path(value).exists()]


def check_model(index_dir: Path, recorded: ModelRef, asked: ModelRef) -> bool:
    """Refuse `asked` when the index in `index_dir` was built with another model (`recorded`); True when
    `recorded` names a checkpoint that no longer exists, which can be neither loaded nor compared: `asked` is
    then taken as where it moved, with a warning."""
    gone = recorded.missing_files()
    if gone:
        warnings.warn(f"{index_dir}: {gone[0]}, the model it was built with, no longer exists; taking {asked} as "
                      "that checkpoint moved (not checked)", stacklevel=3)
        return True
    if asked != recorded and not same_image_tower(recorded, asked):
        raise SearchError(f"{index_dir} was built with model {recorded}, not {asked}: use the same model "
                          "(its embeddings only compare with their own), or a new index folder for another")
    return False


def same_image_tower(recorded: ModelRef, asked: ModelRef) -> bool:
    """Whether a local checkpoint `asked` has the recorded model's image tower and projection, bit for bit: the same
    CLIP with towers bound to it (`clipforge bind`) embeds images into the index's space, so it may query it."""
    import torch

    from clipforge.checkpoint.io import load

    if not Path(asked.name).exists():
        return False
    try:
        ours, theirs = (load(ref.name, pretrained=ref.pretrained)[0].visual.state_dict() for ref in (recorded, asked))
    except Exception:  # any failure to read it: a model that cannot be read is not the index's: the caller refuses it
        return False
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

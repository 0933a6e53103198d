"""Names that point off this machine: `hf-hub:ORG/NAME` and (architecture, pretrained tag) pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.errors import CheckpointError

HUB_PREFIX = "hf-hub:"


def is_remote(name: Any, pretrained: str | None = None) -> bool:
    """Whether loading `name` (with `pretrained`) needs the pretrained cache."""
    return pretrained is not None or (isinstance(name, str) and name.startswith(HUB_PREFIX))


def hub_repo(name: str) -> tuple[str, str | None]:
    """("ORG/NAME", revision or None) of "hf-hub:ORG/NAME[@REVISION]"."""
    repo = name[len(HUB_PREFIX):]
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{name!r}: expected hf-hub:ORG/NAME (optionally @REVISION)")
    return repo, revision or None


def resolve_remote(name: str, pretrained: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(local path to load, load() keyword arguments) for a hub repo or an (architecture, tag) pair."""
    from clipforge.checkpoint.open_clip import open_clip_weights
    from clipforge.pretrained import download, get_pretrained, hub_folder

    if pretrained is None:
        return hub_folder(*hub_repo(name)), {}
    if Path(pretrained).is_file():  # open_clip's convention: pretrained= a weights file for this architecture
        return Path(pretrained), {"config": name}
    entry = get_pretrained(name, pretrained)
    if entry.url:
        path = download(entry.url, entry.sha256)
    else:
        path = open_clip_weights(hub_folder(entry.hf_hub, weights_only=True))
        if path is None:
            raise CheckpointError(f"hf-hub:{entry.hf_hub} holds no open_clip weights for {name} {pretrained!r}")
    return path, {"config": entry.architecture, "mean": entry.mean, "std": entry.std, "resize": entry.resize}

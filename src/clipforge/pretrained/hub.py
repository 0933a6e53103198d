"""Hugging Face hub repos (open_clip's and transformers' CLIP layouts) through huggingface_hub and its cache.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported; they are read again here at each
call, so setting them in a running process (or a test) takes effect.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from clipforge.errors import CheckpointError
from clipforge.pretrained.download import cache_dir, is_offline, sha256_of

OPEN_CLIP_FILES = ("open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
TRANSFORMERS_FILES = ("config.json", ("model.safetensors", "pytorch_model.bin"))
SHA256 = re.compile(r"[0-9a-f]{64}")
# the tokenizer files a repo may carry beside its weights: SigLIP's spiece.model, SigLIP 2's Gemma tokenizer.json
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")


def hub_folder(repo_id: str, revision: str | None = None, weights_only: bool = False) -> Path:
    """Local folder holding the repo's config and weights: open_clip's layout, else transformers'.

    `weights_only`: the weights are enough (the architecture comes from clipforge's registry).
    """
    for config, weights in (OPEN_CLIP_FILES, TRANSFORMERS_FILES):
        if not weights_only and _fetch(repo_id, config, revision, optional=True) is None:
            continue
        extras = ("preprocessor_config.json", "vocab.json", "merges.txt") if weights == TRANSFORMERS_FILES[1] else ()
        _fetch_extras(repo_id, revision, (*extras, *TOKENIZER_FILES))
        for name in weights:
            path = _fetch(repo_id, name, revision, optional=True)
            if path is not None:
                verify_blob(path)
                return path.parent
        if weights_only:
            continue
        raise CheckpointError(f"hf-hub:{repo_id} has {config} but none of {', '.join(weights)}")
    raise CheckpointError(f"hf-hub:{repo_id} is neither an open_clip repo ({OPEN_CLIP_FILES[0]}) nor a transformers "
                     f"CLIP repo ({TRANSFORMERS_FILES[0]})")


def hub_tokenizer_folder(repo_id: str, revision: str | None = None) -> Path | None:
    """The local folder of a repo's tokenizer files alone (no weights), or None when it has none."""
    found = _fetch_extras(repo_id, revision, (*TOKENIZER_FILES, OPEN_CLIP_FILES[0]))
    return found[0].parent if found else None


def _fetch_extras(repo_id: str, revision: str | None, names: tuple[str, ...]) -> list[Path]:
    """The optional files of `names` the repo has (offline: those already cached)."""
    paths = (_fetch(repo_id, name, revision, optional=True, extra=True) for name in names)
    return [path for path in paths if path is not None]


def _fetch(repo_id: str, filename: str, revision: str | None, optional: bool, extra: bool = False) -> Path | None:
    """The cached file; None for an optional one the repo lacks, or an `extra` one offline and never fetched."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=os.environ.get("HF_ENDPOINT"),
                                    cache_dir=hub_cache(), local_files_only=is_offline()))
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base: not cached, and offline or unreachable
        if extra and is_offline():  # a repo without the file leaves nothing in the cache to tell it from "not cached"
            return None
        if is_offline():
            raise CheckpointError(f"offline mode (CLIPFORGE_OFFLINE / HF_HUB_OFFLINE): hf-hub:{repo_id}/{filename} "
                                  f"is not in the Hugging Face cache (HF_HOME); run once online, or "
                                  f"`hf download {repo_id}` on a connected machine and copy its cache") from None
        raise OSError(f"hf-hub:{repo_id}/{filename}: the hub cannot be reached and the file is not cached") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"hf-hub:{repo_id}: no such repository (or it is private: set HF_TOKEN)") from None
    except EntryNotFoundError:
        if optional:
            return None
        raise CheckpointError(f"hf-hub:{repo_id} has no {filename}") from None


def hub_cache() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def verify_blob(path: Path) -> None:
    """Check a hub file against the sha256 its cache blob is named by (large files); once per blob."""
    blob = path.resolve()
    if not SHA256.fullmatch(blob.name):
        return  # small files are stored by git hash, which huggingface_hub does not expose as sha256
    marker = cache_dir() / "verified" / blob.name
    if marker.exists():
        return
    got = sha256_of(blob)
    if got != blob.name:
        blob.unlink()
        path.unlink(missing_ok=True)  # the snapshot's link to it: the next call downloads again
        raise CheckpointError(f"{path.name}: sha256 {got} does not match the hub's {blob.name}; "
                              "the cached copy was removed (download again)")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()

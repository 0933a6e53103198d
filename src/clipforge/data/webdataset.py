"""Reading webdataset tar shards: members grouped into samples by key, with the image and caption of each.

The webdataset convention: a sample's key is a member's path up to the first dot of its basename, and the
rest is the extension (`dir/cat.seg.png` is key `dir/cat`, extension `seg.png`). The image is the first
of `IMAGE_EXTENSIONS` a sample has; its caption is a `.txt` member, else a `.json` one. Indexing
(`clipforge.search.sources`) and evaluation (`clipforge.data.labelled`) both read shards here.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Any

from clipforge.data.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Sample:
    """One webdataset sample that has an image: its key, the image member, and its caption members if any."""

    key: str
    image: tarfile.TarInfo
    text: tarfile.TarInfo | None = None  # the .txt caption
    meta: tarfile.TarInfo | None = None  # the .json caption, read only when there is no .txt


def group_members(tar: tarfile.TarFile) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Each key's files by lower-case extension, keys in the order the tar first lists them (a repeat wins)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in tar:
        folder, _, base = member.name.rpartition("/")
        if member.isfile() and "." in base:
            stem, ext = base.split(".", 1)
            groups.setdefault(f"{folder}/{stem}", {})[ext.lower()] = member
    return groups


def read_samples(tar: tarfile.TarFile) -> list[Sample]:
    """The samples of a shard that have an image, in tar order; the others (captions alone, ...) are left out."""
    samples = []
    for key, parts in group_members(tar).items():
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is not None:
            samples.append(Sample(key, image, parts.get("txt"), parts.get("json")))
    return samples


def read_caption(tar: tarfile.TarFile, sample: Sample) -> str | list[Any] | None:
    """The caption as stored: the .txt text, else the .json's "caption" (or "text") string or list; None without one.

    Malformed JSON raises ValueError: whether that skips the caption or fails the shard is the caller's choice.
    """
    if sample.text is not None:
        return tar.extractfile(sample.text).read().decode("utf-8", errors="replace")
    if sample.meta is None:
        return None
    meta = json.loads(tar.extractfile(sample.meta).read())
    value = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
    return value if isinstance(value, (str, list)) else None

"""What `build_index` indexes: the images of a folder, of a caption CSV, or inside webdataset tar shards.

A source is listed (stat only, no decoding) as `Item`s keyed by an absolute path; images inside a tar are
`/abs/shard.tar#member`, with the tar's mtime (a rewritten tar re-embeds its images). Decoding is left to
`open_item`, so listing a large collection for the incremental diff stays cheap.
"""
from __future__ import annotations

import csv
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from clipforge.data.captions import split_captions
from clipforge.data.images import IMAGE_SUFFIXES
from clipforge.data.webdataset import Sample, read_caption, read_samples
from clipforge.errors import SearchError

TAR_SEPARATOR = "#"


@dataclass(frozen=True)
class Item:
    """One image to index: its key (absolute path), size in bytes, mtime (ns) and caption."""

    path: str
    size: int
    mtime_ns: int
    caption: str | None = None

    @property
    def version(self) -> tuple[int, int]:
        """(size, mtime_ns): what tells a changed file from an indexed one."""
        return self.size, self.mtime_ns


def _stat_item(path: Path, caption: str | None) -> Item:
    info = path.stat()
    return Item(str(path), info.st_size, info.st_mtime_ns, caption)


def _list_folder(root: Path) -> list[Item]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skips .git and our own temp files
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                items.append(_stat_item(path.absolute(), None))
            except OSError:  # vanished or a broken link: not an image we can index
                continue
    return items


def _list_csv(path: Path, separator: str) -> tuple[list[Item], list[str]]:
    """Items of a caption CSV (columns image[,caption]) and the paths of rows whose file is missing."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "image" not in (reader.fieldnames or []):
            raise SearchError(f"{path}: needs an image column (and optionally caption); found {reader.fieldnames}")
        rows = list(reader)
    items: dict[str, Item] = {}
    missing = []
    for row in rows:
        if not row.get("image"):
            continue
        image = (path.parent / row["image"]).absolute()
        captions = [c for c in split_captions(row.get("caption"), separator) if c] if row.get("caption") else []
        caption = separator.join(captions) if captions else None
        try:
            items[str(image)] = _stat_item(image, caption)  # a repeated image: the last row wins
        except OSError:
            missing.append(str(image))
    return list(items.values()), missing


def _tar_caption(tar: tarfile.TarFile, sample: Sample) -> str | None:
    """The caption an index records: a JSON list joined with " | ", blank or malformed as none."""
    try:
        value = read_caption(tar, sample)
    except ValueError:  # a bad caption is no reason to leave its image out of the index
        return None
    if isinstance(value, list):
        value = " | ".join(v for v in value if isinstance(v, str))
    return value.strip() or None if isinstance(value, str) else None


def _list_tar(shard: str) -> list[Item]:
    path = Path(shard).absolute()
    mtime = path.stat().st_mtime_ns
    try:
        with tarfile.open(path) as tar:
            return [Item(f"{path}{TAR_SEPARATOR}{sample.image.name}", sample.image.size, mtime,
                         _tar_caption(tar, sample)) for sample in read_samples(tar)]
    except (tarfile.TarError, OSError) as error:
        raise SearchError(f"{shard}: unreadable shard: {error}") from None


def list_source(source: str | Path | Sequence[str | Path], separator: str = "|") -> tuple[list[Item], list[str]]:
    """(items sorted by path, paths listed by a CSV whose file is missing) of a folder, CSV or shard(s)."""
    missing: list[str] = []
    if not isinstance(source, (str, Path)):
        items = [item for shard in source for item in _list_tar(str(shard))]
    elif ".tar" in str(source) and not Path(source).is_dir():
        from clipforge.data.shards import expand_shards

        items = [item for shard in expand_shards(str(source)) for item in _list_tar(shard)]
    else:
        path = Path(source)
        if path.is_dir():
            items = _list_folder(path)
        elif path.is_file() and path.suffix.lower() == ".csv":
            items, missing = _list_csv(path, separator)
        elif path.exists():
            raise SearchError(f"{path}: not an image folder, caption CSV or webdataset .tar shard")
        else:
            raise FileNotFoundError(f"source not found: {path}")
    return sorted(items, key=lambda item: item.path), missing


class ItemReader:
    """Reads items' bytes or paths for `decode_image`, keeping the current tar open (items come sorted)."""

    def __init__(self) -> None:
        self._tar: tarfile.TarFile | None = None
        self._tar_path = ""
        self._members: dict[str, tarfile.TarInfo] = {}

    def read(self, path: str) -> str | bytes:
        """The file path itself, or the bytes of a tar member."""
        tar_path, sep, member = path.partition(f".tar{TAR_SEPARATOR}")
        if not sep:
            return path
        if f"{tar_path}.tar" != self._tar_path:
            self.close()
            self._tar = tarfile.open(f"{tar_path}.tar")
            self._tar_path = f"{tar_path}.tar"
            self._members = {m.name: m for m in self._tar.getmembers()}
        handle = self._tar.extractfile(self._members[member]) if member in self._members else None
        if handle is None:
            raise FileNotFoundError(f"{path}: not in the shard")
        return handle.read()

    def close(self) -> None:
        """Close the open tar, if any."""
        if self._tar is not None:
            self._tar.close()
        self._tar, self._tar_path, self._members = None, "", {}

"""Downloads into a verified cache: sha256 checked, interrupted transfers resumed, offline mode explained."""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from clipforge.errors import CheckpointError
from clipforge.io import cache_root

CHUNK = 1 << 20
RETRIES = 5  # resumed attempts after a dropped connection


def cache_dir() -> Path:
    """$CLIPFORGE_CACHE/pretrained, default ~/.cache/clipforge/pretrained."""
    return cache_root() / "pretrained"


def is_offline() -> bool:
    """CLIPFORGE_OFFLINE=1 or HF_HUB_OFFLINE=1: use the cache only."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, sha256: str, dest: Path | None = None, progress: bool = True) -> Path:
    """The file at `url`, from the cache when its sha256 matches, else downloaded (resuming DEST.part) and checked.

    Default DEST: cache_dir()/SHA256/FILENAME, so two files of one name never collide.
    """
    dest = dest or cache_dir() / sha256 / url.rstrip("/").rsplit("/", 1)[-1]
    if dest.is_file():
        if sha256_of(dest) == sha256:
            return dest
        dest.unlink()  # a corrupted or replaced cache entry: fetch it again
    if is_offline():
        raise CheckpointError(f"offline mode (CLIPFORGE_OFFLINE / HF_HUB_OFFLINE) and {dest.name} is not in the cache: "
                         f"download {url} on a connected machine and put it at {dest} (sha256 {sha256})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    for attempt in range(RETRIES + 1):
        try:
            _fetch(url, partial, progress)
            break
        except OSError as error:  # URLError, ConnectionError and TimeoutError are OSErrors
            if isinstance(error, urllib.error.HTTPError) or attempt == RETRIES:
                raise OSError(f"download of {url} failed ({error}); {partial.stat().st_size if partial.exists() else 0}"
                              f" bytes kept in {partial}, a later call resumes") from None
    got = sha256_of(partial)
    if got != sha256:
        partial.unlink()
        raise CheckpointError(f"{url}: sha256 {got} does not match the published {sha256}; the download was removed "
                         "(a changed or corrupted file: nothing was loaded)")
    os.replace(partial, dest)
    return dest


def _fetch(url: str, partial: Path, progress: bool) -> None:
    """Append the rest of `url` to `partial` (an HTTP Range request when some of it is there)."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        mode = "ab" if have else "wb"
        with open(partial, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                              desc=partial.name.removesuffix(".part"), disable=not progress) as bar:
            while block := response.read(CHUNK):
                out.write(block)
                bar.update(len(block))
        if total is not None and partial.stat().st_size < total:
            raise ConnectionError(f"connection closed after {partial.stat().st_size} of {total} bytes")


"""Tux Paint stamps dataset: photo cut-outs and clip art, each with an English sentence (GPL-2).

Source, first found wins: --stamps DIR (an unpacked `stamps` folder); a cached
`tuxpaint-stamps-default_*.deb` in the cache folder; an installed /usr/share/tuxpaint/stamps; else
`apt-get download tuxpaint-stamps-default` (one `apt-get update` and a retry on failure). A .deb is
unpacked once (images and texts only, via `dpkg-deb --fsys-tarfile`) into CACHE/<deb name>.unpacked.

Each stamp is an image (PNG, or SVG rendered with resvg; when both exist the SVG wins, as in Tux Paint)
with a .txt whose first line is the English caption (other lines are translations). The category is the
first folder under stamps/. `*_mirror.png` files and images without text are skipped. Images are cropped
to their content (alpha > 8), padded square, composited on white and resized.

Layout written under ROOT/tuxpaint (atomically, via ROOT/.tuxpaint.tmp):

    images/<category>/<name>.png  RGB, SIZE x SIZE; name = file stem, or its path under the category
                                  joined with '-' where two stamps of a category share a stem
    captions.csv   image (relative path), caption, key (= name), category
    labels.csv     image, label (= category), class_index (sorted categories)
    manifest.json  options, source (package, version, sha256), counts per category, skips, clipforge version

With --audio (`audio=True`) the stamps' recordings too: audio/<category>/*.ogg and audio.csv (see tuxpaint_audio).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from clipforge.corpora.fetch import (
    DatasetError,
    atomic_dataset,
    clipforge_version,
    deb_field,
    fetch_deb,
    installed_version,
    read_manifest,
    sha256_file,
    unpack_deb_cached,
    write_csv,
    write_json,
)
from clipforge.corpora.render import render_svg, to_size
from clipforge.corpora.tuxpaint_audio import AUDIO_COLUMNS, write_stamp_audio
from clipforge.errors import DataError

BUILDER_VERSION = 1
PACKAGE = "tuxpaint-stamps-default"
INSTALLED = Path("/usr/share/tuxpaint/stamps")
_STAMPS_IN_DEB = "usr/share/tuxpaint/stamps"
_IMAGE_SUFFIXES = (".svg", ".png")  # preference order
_ALPHA_THRESHOLD = 8  # near-transparent fringe pixels would stretch the crop box


@dataclass
class Stamp:
    """One stamp image with its caption and category."""

    path: Path
    category: str
    name: str
    caption: str


def _first_line(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
    return (text.splitlines() or [""])[0].strip()


def collect_stamps(stamps: Path) -> tuple[list[Stamp], Counter]:
    """Captioned stamps under a stamps folder, sorted by (category, name), and counts of skipped files."""
    skipped: Counter = Counter()
    chosen: dict[Path, Path] = {}  # path without suffix -> image file
    for path in sorted(p for p in stamps.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()):
        if path.stem.endswith("_mirror"):
            skipped["mirror"] += 1
            continue
        stem = path.relative_to(stamps).with_suffix("")
        if stem in chosen:
            skipped["png_with_svg"] += 1
            if path.suffix.lower() == ".svg":  # rglob order is by name: .png sorts before .svg
                chosen[stem] = path
            continue
        chosen[stem] = path
    entries = []
    for stem, path in chosen.items():
        if len(stem.parts) < 2:
            skipped["no_category"] += 1
            continue
        text = path.with_suffix(".txt")
        caption = _first_line(text) if text.is_file() else ""
        if not caption:
            skipped["no_text"] += 1
            continue
        entries.append((stem, path, caption.replace("|", "/")))
    stems = Counter((stem.parts[0], stem.name) for stem, _, _ in entries)
    out = []
    for stem, path, caption in entries:
        category = stem.parts[0]
        name = stem.name if stems[(category, stem.name)] == 1 else "-".join(stem.parts[1:])
        out.append(Stamp(path, category, name, caption))
    out.sort(key=lambda s: (s.category, s.name))
    return out, skipped


def load_stamp(path: Path, size: int) -> Image.Image | None:
    """A stamp cropped to content, padded square, on white, size x size; None if fully transparent."""
    if path.suffix.lower() == ".svg":
        # System fonts only for stamps with <text> (currency signs): loading them slows every render.
        fonts = b"<text" in path.read_bytes()
        probe = render_svg(path, width=32, system_fonts=fonts)  # natural sizes reach 1,800 px: slow to render
        side = max(4 * size, 256)  # oversample, then crop and downsample
        shape = {"width": side} if probe.width >= probe.height else {"height": side}
        image = render_svg(path, system_fonts=fonts, **shape)
    else:
        with Image.open(path) as opened:
            opened.load()
            image = opened.convert("RGBA")  # P with tRNS and LA keep their transparency
    box = image.getchannel("A").point(lambda a: 255 if a > _ALPHA_THRESHOLD else 0).getbbox()
    if box is None:
        return None
    return to_size(image.crop(box), size)


def _source(cache: Path, stamps: Path | None, audio: bool = False) -> tuple[Path, dict]:
    """The stamps folder to read and a description of where it came from."""
    if stamps is not None:
        if not Path(stamps).is_dir():
            raise DataError(f"--stamps {stamps} is not a folder")
        return Path(stamps), {"kind": "folder", "path": str(stamps)}
    if not any(cache.glob(f"{PACKAGE}_*.deb")) and INSTALLED.is_dir():
        return INSTALLED, {"kind": "installed", "path": str(INSTALLED), "package": PACKAGE,
                           "version": installed_version(PACKAGE)}
    deb = fetch_deb(PACKAGE, cache)
    version, digest = deb_field(deb, "Version"), sha256_file(deb)
    # Unpacking means decompressing 161 MB of xz (10 s): done once, kept beside the .deb.
    keep, tag = (_wanted_with_audio, "stamps-audio") if audio else (_wanted, "stamps")
    unpacked = unpack_deb_cached(deb, keep, f"{tag}-v{BUILDER_VERSION}", digest)
    folder = unpacked / _STAMPS_IN_DEB
    if not folder.is_dir():
        raise DatasetError(f"{deb} has no {_STAMPS_IN_DEB}/ folder: not a Tux Paint stamps package?")
    return folder, {"kind": "deb", "package": PACKAGE, "version": version, "deb": deb.name, "sha256": digest}


def _wanted(name: str) -> bool:
    return name.lstrip("./").startswith(_STAMPS_IN_DEB) and name.lower().endswith((".png", ".svg", ".txt"))


def _wanted_with_audio(name: str) -> bool:
    return _wanted(name) or (name.lstrip("./").startswith(_STAMPS_IN_DEB) and name.lower().endswith(".ogg"))


def build_tuxpaint(root: Path, size: int = 64, limit: int | None = None, cache: Path | None = None,
                   stamps: Path | None = None, force: bool = False, progress: bool = True, audio: bool = False) -> dict:
    """Build ROOT/tuxpaint (module docstring; `audio`: the stamps' recordings too); returns the manifest, with
    "up_to_date": True when nothing was done."""
    root = Path(root)
    if size < 8 or (limit is not None and limit < 1):
        raise DataError("--size must be >= 8 and --limit >= 1")
    options = {"builder_version": BUILDER_VERSION, "size": size, "limit": limit,
               "stamps": str(Path(stamps).resolve()) if stamps else None, **({"audio": True} if audio else {})}
    existing = read_manifest(root / "tuxpaint")
    if not force and existing is not None and existing.get("options") == options:
        return {**existing, "up_to_date": True}
    start = time.perf_counter()
    cache = Path(cache) if cache is not None else root / ".cache"
    folder, source = _source(cache, stamps, audio)
    found, skipped = collect_stamps(folder)
    if not found:
        raise DatasetError(f"no captioned stamp images under {folder}")
    selected = found[:limit] if limit else found
    with atomic_dataset(root, "tuxpaint") as out:
        written, unreadable = [], []
        for stamp in tqdm(selected, desc="tuxpaint", disable=not progress or None):
            try:
                image = load_stamp(stamp.path, size)
            except (OSError, ValueError) as error:  # one broken stamp should not sink the set
                unreadable.append(f"{stamp.path.relative_to(folder)}: {error}")
                continue
            if image is None:
                skipped["empty"] += 1
                continue
            target = out / "images" / stamp.category / f"{stamp.name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            written.append(stamp)
        categories = sorted({s.category for s in written})
        index = {c: i for i, c in enumerate(categories)}
        rows = [(f"images/{s.category}/{s.name}.png", s) for s in written]
        write_csv(out / "captions.csv", ["image", "caption", "key", "category"],
                  ((image, s.caption, s.name, s.category) for image, s in rows))
        write_csv(out / "labels.csv", ["image", "label", "class_index"],
                  ((image, s.category, index[s.category]) for image, s in rows))
        manifest = {
            "dataset": "tuxpaint", "options": options, "clipforge_version": clipforge_version(),
            "image_size": size, "source": source, "stamps": len(written), "categories": len(categories),
            "per_category": dict(Counter(s.category for s in written).most_common()),
            "skipped_files": {**skipped, "unreadable": len(unreadable)}, "unreadable": unreadable,
        }
        if audio:
            audio_rows, counts = write_stamp_audio(out, rows, {s.path.with_suffix("") for s in found})
            write_csv(out / "audio.csv", AUDIO_COLUMNS, audio_rows)
            manifest["audio"] = {"recordings": len(audio_rows), "stamps": len({r[2] for r in audio_rows}),
                                 "by_kind": dict(sorted(counts.items()))}
        manifest["build_seconds"] = round(time.perf_counter() - start, 1)
        write_json(out / "manifest.json", manifest)
    return {**manifest, "up_to_date": False}

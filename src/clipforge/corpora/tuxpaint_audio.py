"""The sounds of Tux Paint stamps (`clipforge data tuxpaint --audio`), each paired with its stamp's picture.

Beside a stamp `NAME.png|svg` the package keeps, in the same folder:

    NAME.ogg               a sound effect (an animal's call, an instrument; a spoken letter under symbols/)
    NAME_LANG.ogg          the stamp's name spoken in LANG (the digits under symbols/math)
    NAME_desc.ogg          the stamp's description read aloud in English
    NAME_desc_LANG.ogg     ... in LANG (fr, ru, ro, ca, bg, es, be, el, da, lt, nl, ml)

A file whose stem is itself a stamp's (`cow_white.ogg` next to the stamps cow and cow_white) belongs to that stamp.
The recordings are copied as they are (Ogg Vorbis, decoded by clipforge's audio policy when used) to
audio/<category>/, and listed in audio.csv: image, audio, key (the stamp), label (its English text as a class name:
"A sleeping capybara." -> "sleeping capybara"), category, kind (effect, name, description), language ("" for
effects), transcript (the stamp's text in that language, when it has one) and split (train/test by stamp: a stamp's
recordings never straddle the split).
"""
from __future__ import annotations

import hashlib
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, NamedTuple

AUDIO_COLUMNS = ["image", "audio", "key", "label", "category", "kind", "language", "transcript", "split"]
TEST_SHARE = 0.2  # stamps held out for evaluation
_LANGUAGE = r"[a-z]{2,3}(?:_[A-Z]{2})?"
_DESCRIPTION = re.compile(rf"^_desc(?:_({_LANGUAGE}))?$")
_NAME = re.compile(rf"^_({_LANGUAGE})$")


class Recording(NamedTuple):
    """One sound file of a stamp."""

    path: Path
    kind: str  # "effect", "name" or "description"
    language: str  # "" for an effect; "en" for an English description


def stamp_split(key: str) -> str:
    """"test" for about TEST_SHARE of the stamps (a hash of the key: stable across builds), else "train"."""
    digest = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)
    return "test" if digest / 0xFFFFFFFF < TEST_SHARE else "train"


def recordings_of(image: Path, stamp_stems: set[Path], languages: set[str] = frozenset()) -> list[Recording]:
    """The stamp's sound files (module docstring), sorted by file name; a spoken name's suffix must be one of
    `languages` (those of the stamp's text), so `cow_big.ogg` is not cow's name in a language "big"."""
    stem = image.with_suffix("")
    found = []
    for path in sorted(image.parent.glob(f"{glob_escape(stem.name)}*.ogg")):
        rest = path.stem[len(stem.name):]
        if path.with_suffix("") in stamp_stems and rest:
            continue  # another stamp's own sound
        if rest == "":
            found.append(Recording(path, "effect", ""))
        elif (match := _DESCRIPTION.match(rest)) is not None:
            found.append(Recording(path, "description", match.group(1) or "en"))
        elif (match := _NAME.match(rest)) is not None and match.group(1) in languages:
            found.append(Recording(path, "name", match.group(1)))
    return found


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def class_name(sentence: str) -> str:
    """A stamp's English sentence as a class name: no leading article, no closing punctuation."""
    name = re.sub(r"^(a|an|the|some)\s+", "", sentence.strip(), flags=re.IGNORECASE)
    return name.rstrip(" .!?").strip() or sentence.strip()


def transcripts(text_file: Path) -> dict[str, str]:
    """The stamp's text by language: the first line is English, then `LANG.utf8=text` lines."""
    if not text_file.is_file():
        return {}
    lines = text_file.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff").splitlines()
    found = {"en": lines[0].strip()} if lines else {}
    for line in lines[1:]:
        tag, _, text = line.partition("=")
        language = tag.split(".")[0]
        if text.strip() and language:
            found.setdefault(language, text.strip())
    return found


def write_stamp_audio(out: Path, stamps: Iterable[tuple[str, object]], stamp_stems: set[Path]) -> tuple[list, Counter]:
    """Copy each written stamp's recordings into OUT/audio/<category>/ and return audio.csv's rows and counts by
    kind/language. `stamps`: (image cell, Stamp) pairs."""
    rows, counts = [], Counter()
    for image_cell, stamp in stamps:
        texts = transcripts(stamp.path.with_suffix(".txt"))
        for recording in recordings_of(stamp.path, stamp_stems, set(texts)):
            suffix = recording.path.stem[len(stamp.path.stem):]
            cell = f"audio/{stamp.category}/{stamp.name}{suffix}.ogg"
            (out / cell).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(recording.path, out / cell)
            transcript = texts.get(recording.language, "") if recording.language else ""
            rows.append((image_cell, cell, stamp.name, class_name(stamp.caption), stamp.category, recording.kind,
                         recording.language, transcript, stamp_split(stamp.name)))
            counts[f"{recording.kind}:{recording.language}" if recording.language else recording.kind] += 1
    return rows, counts

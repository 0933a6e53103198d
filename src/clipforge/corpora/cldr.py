"""Emoji names in other languages for the emoji set (`clipforge data emoji --languages ko,ja`): each concept's
CLDR text-to-speech name and keywords from the pinned npm packages cldr-annotations-full and
cldr-annotations-derived-full (sequences and variants; the full set wins where both name a character).

Per language LANG, written beside the English tables:

    concepts-LANG.csv  hexcode, name (CLDR tts), keywords ('|'-joined): the labels of zero-shot in LANG
    captions-LANG.csv  image, caption (candidates joined by '|': name; name + 1-3 seeded keywords), key, style,
                       split: the same images and keys as captions.csv, so batches keep one sample per concept

A concept CLDR does not name in LANG has no row there; the manifest counts and lists them."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from clipforge.corpora.fetch import NpmPackage, write_csv
from clipforge.errors import DataError

CLDR_PACKAGES = (
    NpmPackage("cldr-annotations-full", "48.2.0", "28576e51225deb51e3ddd734b0f824a0079682cb5d8c27faa9f68149317a14d1"),
    NpmPackage("cldr-annotations-derived-full", "48.2.0",
               "4be946ff5815f806ec78b50363d577a769f2fbfb90c6380a44e161a92436996e"),
)
_FOLDERS = ("annotations", "annotationsDerived")  # each package's folder of per-language files
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")  # CLDR's locale ids: ko, ja, zh-Hant, sr-Latn
VARIATION_SELECTOR = "\ufe0f"


def parse_languages(languages: Sequence[str] | None) -> list[str]:
    """Language codes from `--languages ko,ja` (space- or comma-separated), in the order given, without repeats."""
    chosen = [s.strip() for item in languages or () for s in item.split(",") if s.strip()]
    bad = [code for code in chosen if not _LANGUAGE.match(code)]
    if bad:
        raise DataError(f"not CLDR language codes: {bad} (e.g. ko, ja, fr, zh-Hant)")
    return list(dict.fromkeys(chosen))


def members(languages: Sequence[str]) -> list[set[str]]:
    """The tarball members to extract from each CLDR package: the chosen languages' annotation files."""
    return [{f"package/{folder}/{lang}/annotations.json" for lang in languages} for folder in _FOLDERS]


def read_names(packages: Sequence[Path], language: str) -> dict[str, dict[str, list[str]]]:
    """character string without U+FE0F (CLDR writes it in some keys, in some places) -> {"tts": [...],
    "default": [...]} of one language (the derived set first, the full set over it)."""
    names: dict[str, dict[str, list[str]]] = {}
    found = False
    for package, folder in zip(reversed(packages), reversed(_FOLDERS)):
        path = Path(package) / folder / language / "annotations.json"
        if not path.is_file():
            continue
        found = True
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data[folder]["annotations"].items()
        names.update({text.replace(VARIATION_SELECTOR, ""): entry for text, entry in entries})
    if not found:
        available = sorted(p.name for p in (Path(packages[0]) / _FOLDERS[0]).glob("*") if p.is_dir())
        raise DataError(f"CLDR has no emoji names in {language!r}" + (f"; it has {', '.join(available[:40])}, ..."
                                                                        if available else ""))
    return names


def lookup(names: dict[str, dict[str, list[str]]], key: str) -> tuple[str, list[str]] | None:
    """(name, keywords) of the concept with hexcode `key` (no fe0f), or None when the language does not name it."""
    entry = names.get("".join(chr(int(cp, 16)) for cp in key.split("-")))
    if not entry or not entry.get("tts"):
        return None
    name = entry["tts"][0].strip()
    return name, [k.strip() for k in entry.get("default", []) if k.strip() and k.strip() != name]


def caption_candidates(key: str, name: str, keywords: Sequence[str], seed: int, extra: int = 4) -> list[str]:
    """Captions for one concept in one language: the name, and the name with 1-3 seeded keywords."""
    rng = random.Random(f"clipforge-emoji-cldr:{seed}:{key}")
    out = [name]
    for _ in range(extra if keywords else 0):
        out.append(", ".join([name, *rng.sample(list(keywords), rng.randint(1, min(3, len(keywords))))]))
    return list(dict.fromkeys(text.replace("|", "/") for text in out))


def write_language_tables(out: Path, packages: Sequence[Path], languages: Sequence[str], concepts: Sequence[Any],
                          rows: Sequence[tuple[str, Any, str]], seed: int) -> dict[str, dict[str, Any]]:
    """concepts-LANG.csv and captions-LANG.csv for each language (module docstring); per language the count of
    concepts named and the hexcodes it does not name."""
    summary = {}
    for language in languages:
        names = read_names(packages, language)
        found = {c.key: text for c in concepts if (text := lookup(names, c.key)) is not None}
        write_csv(out / f"concepts-{language}.csv", ["hexcode", "name", "keywords"],
                  ([c.key, found[c.key][0], "|".join(found[c.key][1])] for c in concepts if c.key in found))
        captions = {key: "|".join(caption_candidates(key, *text, seed)) for key, text in found.items()}
        write_csv(out / f"captions-{language}.csv", ["image", "caption", "key", "style", "split"],
                  ((image, captions[c.key], c.key, style, c.split) for image, c, style in rows if c.key in found))
        summary[language] = {"concepts": len(found), "missing": [c.key for c in concepts if c.key not in found]}
    return summary

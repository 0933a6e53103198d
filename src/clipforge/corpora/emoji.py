"""Multi-style emoji dataset: the same Unicode concepts drawn by six artists, with CLDR text (emojibase).

Sources are pinned npm packages fetched with `npm pack` (see PACKAGES); the concepts kept are the base
emoji (no skin-tone variants) present in all six styles, joined by hexcode without `fe0f`, lower-cased
(1,594 with the pinned versions). The concept list and the split never depend on --styles: a subset
build has the same concepts, class indices and split as the full one.

Layout written under ROOT/emoji (atomically, via ROOT/.emoji.tmp):

    images/<style>/<hexcode>.png  RGB on white, SIZE x SIZE; style in STYLES, or in EVAL_STYLES when asked
                                  for (only the concepts that style draws)
    concepts.csv   hexcode, label, tags ('|'-joined, alphabetic only), group, subgroup, split (seen/unseen),
                   gender (man/woman/person/''), base_concept (label of the gender-neutral concept, for a
                   bias probe: "man health worker" -> "health worker")
    captions.csv   image (relative path), caption (candidates joined by '|': label; label + 1-3 tags; label +
                   subgroup; never a style word), key (hexcode), style, split
    labels.csv     image, label, class_index (concept order in concepts.csv), style, split
    manifest.json  options, package versions and tarball sha256, counts per style, split seed, image size,
                   clipforge version

The split is by concept family (a gender-neutral concept with its man/woman and facing-right
variants), so no unseen concept has a near-duplicate among the seen ones: in emojibase order, one
family of every five, picked with the seed, is "unseen" (about 20% of concepts), the rest "seen".
"""
from __future__ import annotations

import json
import random
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

from PIL import Image
from tqdm import tqdm

from clipforge.corpora.cldr import CLDR_PACKAGES, members, parse_languages, write_language_tables
from clipforge.corpora.fetch import (
    DatasetError,
    NpmPackage,
    atomic_dataset,
    clipforge_version,
    fetch_npm,
    prefix_filter,
    read_manifest,
    safe_extract,
    write_csv,
    write_json,
)
from clipforge.corpora.render import render_svg, to_size
from clipforge.errors import DataError

BUILDER_VERSION = 1
STYLES = ("google", "twitter", "openmoji-color", "openmoji-black", "fluent-flat", "fluent-3d")
PACKAGES = {
    "google": NpmPackage("emoji-datasource-google", "16.0.0",
                         "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"),
    "twitter": NpmPackage("emoji-datasource-twitter", "16.0.0",
                          "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"),
    "openmoji": NpmPackage("openmoji", "17.0.0", "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68"),
    "fluent-flat": NpmPackage("@iconify-json/fluent-emoji-flat", "1.2.6",
                              "7d064769dee690815f823bc5bcc511d957198caf9f5edd8dd9c1aa48a6aeb175"),
    "fluent-3d": NpmPackage("@iconify-json/fluent-emoji", "1.2.7",
                            "8044210dbf11e016d4de85f15d01a243423bd832457e7e2491df1b751c0e272b"),
    "emojibase": NpmPackage("emojibase-data", "17.0.0",
                            "d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a"),
}
# Evaluation-only styles: Iconify emoji sets with art none of the six has (fluent-emoji-high-contrast is
# monochrome line art). Never in the default selection, so default builds (options, outputs, the demo) are
# unchanged and nothing trains on them; `--styles` asks for them. Matched to concepts by the set's `chars`
# code points, else by the CLDR label slug ("grinning face" -> grinning-face).
EVAL_STYLES = ("fluent-high-contrast", "noto-v1", "emojione", "emojione-monotone")
EVAL_PACKAGES = {
    "fluent-high-contrast": NpmPackage("@iconify-json/fluent-emoji-high-contrast", "1.2.6",
                                       "0b92d48c90d2200bd499e3cdd09a127ca6a8c8ddefd34c35eb5a1e4994012ae0"),
    "noto-v1": NpmPackage("@iconify-json/noto-v1", "1.2.5",
                          "2bf62c26c2c2884aa99e90aec942cdaee17a5921f05690694f4978ad4b017c37"),
    "emojione": NpmPackage("@iconify-json/emojione", "1.2.3",
                           "26a14f44284407e8bcde91799388dca2bfd91dbcd55a97f425524a1c5b73610e"),
    "emojione-monotone": NpmPackage("@iconify-json/emojione-monotone", "1.2.1",
                                    "40b90004bafb406b59266155ef9b7e1dd67bf2947fc8db8d07388776f4d0d04e"),
}
UNSEEN_ONE_IN = 5  # families per block, one of which is unseen: 20%
# Words that name a style or its maker: kept out of captions so text cannot leak the style.
STYLE_WORDS = frozenset({"google", "noto", "twitter", "twemoji", "openmoji", "fluent", "microsoft"})
_ALPHA_TAG = re.compile(r"[^\W\d_]+(?:[ '’-][^\W\d_]+)*")
_WORD = re.compile(r"[^\W\d_]+")
_GENDER_CODES = {"2640": "woman", "2642": "man"}
_FAMILY_CPS = {"1f468", "1f469", "1f9d1", "1f466", "1f467", "1f476", "1f9d2"}

Source = Union[Path, str]  # a PNG/SVG file, or SVG markup


@dataclass
class Concept:
    """One base emoji with its text."""

    key: str
    label: str
    tags: list[str]
    group: str
    subgroup: str
    order: int
    gender: str = ""
    base_concept: str = ""
    family: str = ""
    split: str = ""


def normalize_hexcode(hexcode: str) -> str:
    """Join key: lower-case code points without the fe0f variation selector."""
    return "-".join(p for p in hexcode.lower().replace("_", "-").split("-") if p and p != "fe0f")


def _neutral(key: str) -> str:
    """The gender-neutral hexcode: drop ZWJ+female/male sign, man/woman -> person."""
    parts = key.split("-")
    out = []
    for i, cp in enumerate(parts):
        if cp == "200d" and i + 1 < len(parts) and parts[i + 1] in _GENDER_CODES:
            continue
        if cp in _GENDER_CODES and i > 0 and parts[i - 1] == "200d":
            continue
        out.append(cp)
    if out and out[0] in ("1f468", "1f469") and not _FAMILY_CPS & set(out[1:]):
        out[0] = "1f9d1"
    return "-".join(out)


def _gender(key: str, entry: dict) -> str:
    if "gender" in entry:  # emojibase: 0 female, 1 male
        return "woman" if entry["gender"] == 0 else "man"
    parts = key.split("-")
    if parts[0] in ("1f468", "1f469") and not _FAMILY_CPS & set(parts[1:]):
        return "man" if parts[0] == "1f468" else "woman"
    return ""


def _has_style_word(text: str) -> bool:
    return bool(STYLE_WORDS & set(_WORD.findall(text.lower())))


def _alpha_tags(tags: Sequence[str], label: str) -> list[str]:
    out = []
    for tag in tags:
        tag = tag.strip()
        if (_ALPHA_TAG.fullmatch(tag) and tag.lower() != label.lower() and tag not in out
                and not _has_style_word(tag)):
            out.append(tag)
    return out


def load_concepts(emojibase: Path) -> dict[str, Concept]:
    """Base emoji with label, alphabetic tags, group and subgroup names from an unpacked emojibase-data."""
    data = json.loads((emojibase / "en" / "data.json").read_text(encoding="utf-8"))
    messages = json.loads((emojibase / "en" / "messages.json").read_text(encoding="utf-8"))
    groups = {g["order"]: g["message"] for g in messages["groups"]}
    subgroups = {g["order"]: g["message"] for g in messages["subgroups"]}
    concepts = {}
    for entry in data:  # skin-tone variants sit under "skins" and are left out
        if "group" not in entry:  # regional indicators: not emoji on their own
            continue
        key = normalize_hexcode(entry["hexcode"])
        concepts[key] = Concept(key, entry["label"], _alpha_tags(entry.get("tags", []), entry["label"]),
                                groups.get(entry["group"], ""), subgroups.get(entry.get("subgroup"), ""),
                                int(entry.get("order", 0)), gender=_gender(key, entry))
    return concepts


def _datasource_index(folder: Path, style: str) -> dict[str, Source]:
    entries = json.loads((folder / "emoji.json").read_text(encoding="utf-8"))
    return {normalize_hexcode(e["unified"]): folder / "img" / style / "64" / e["image"]
            for e in entries if e.get(f"has_img_{style}")}


def _openmoji_index(folder: Path, variant: str) -> dict[str, Source]:
    entries = json.loads((folder / "data" / "openmoji.json").read_text(encoding="utf-8"))
    return {normalize_hexcode(e["hexcode"]): folder / variant / "svg" / f"{e['hexcode']}.svg"
            for e in entries if not e.get("skintone")}


def iconify_svg(icon_set: dict, name: str) -> str | None:
    """Standalone SVG markup for an Iconify icon (aliases and flips resolved); None if absent or rotated."""
    flips, rotate = [False, False], 0
    for _ in range(8):  # alias chains are short; the bound guards against a cycle
        entry = icon_set.get("icons", {}).get(name) or icon_set.get("aliases", {}).get(name)
        if entry is None:
            return None
        flips = [flips[0] ^ bool(entry.get("hFlip")), flips[1] ^ bool(entry.get("vFlip"))]
        rotate += int(entry.get("rotate", 0))
        if name in icon_set.get("icons", {}):
            break
        name = entry["parent"]
    else:
        return None
    if rotate % 4:  # no icon of the pinned sets is rotated
        return None
    icon = icon_set["icons"][name]
    left, top = icon.get("left", icon_set.get("left", 0)), icon.get("top", icon_set.get("top", 0))
    width, height = icon.get("width", icon_set.get("width", 16)), icon.get("height", icon_set.get("height", 16))
    body = icon["body"].replace("currentColor", "#000")
    if any(flips):  # as @iconify/utils iconToSVG: mirror inside the box, which then starts at 0 0
        h, v = flips
        body = (f'<g transform="translate({width + left if h else -left} {height + top if v else -top}) '
                f'scale({-1 if h else 1} {-1 if v else 1})">{body}</g>')
        left = top = 0
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{width}" height="{height}" viewBox="{left} {top} {width} {height}">{body}</svg>')


def _fluent_index(icons_file: Path, chars_file: Path) -> dict[str, Source]:
    icon_set = json.loads(icons_file.read_text(encoding="utf-8"))
    chars = json.loads(chars_file.read_text(encoding="utf-8"))
    index = {}
    for hexcode, name in chars.items():
        svg = iconify_svg(icon_set, name)
        if svg is not None:
            index[normalize_hexcode(hexcode)] = svg
    return index


def label_slug(label: str) -> str:
    """An Iconify emoji name from a CLDR label: "man’s shoe" -> "mans-shoe", "piñata" -> "pinata"."""
    ascii_text = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode().lower().replace("'", "")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")


def eval_style_index(icons_file: Path, chars_file: Path, concepts: dict[str, Concept]) -> dict[str, Source]:
    """hexcode -> SVG of an Iconify emoji set: by its chars code points, else the label slug (without "(...)")."""
    icon_set = json.loads(icons_file.read_text(encoding="utf-8"))
    chars = json.loads(chars_file.read_text(encoding="utf-8")) if chars_file.is_file() else {}
    by_code = {normalize_hexcode(hexcode): name for hexcode, name in chars.items()}
    index = {}
    for c in concepts.values():
        for name in (by_code.get(c.key), label_slug(c.label), label_slug(re.sub(r"\(.*?\)", "", c.label))):
            svg = iconify_svg(icon_set, name) if name else None
            if svg is not None:
                index[c.key] = svg
                break
    return index


def style_indexes(src: dict[str, Path]) -> dict[str, dict[str, Source]]:
    """hexcode -> image source for every style, from the unpacked packages (folders ending in package/)."""
    flat_chars = src["fluent-flat"] / "chars.json"  # fluent-emoji ships an empty chars.json; names match flat's
    return {
        "google": _datasource_index(src["google"], "google"),
        "twitter": _datasource_index(src["twitter"], "twitter"),
        "openmoji-color": _openmoji_index(src["openmoji"], "color"),
        "openmoji-black": _openmoji_index(src["openmoji"], "black"),
        "fluent-flat": _fluent_index(src["fluent-flat"] / "icons.json", flat_chars),
        "fluent-3d": _fluent_index(src["fluent-3d"] / "icons.json", flat_chars),
    }


def assign_families_and_split(concepts: list[Concept], seed: int) -> None:
    """Set gender/base_concept/family and the seeded 80/20 seen/unseen split of families (in place)."""
    by_key = {c.key: c for c in concepts}
    for c in concepts:
        neutral = _neutral(c.key)
        if c.gender in ("man", "woman") and neutral != c.key and neutral in by_key:
            c.base_concept = by_key[neutral].label
            by_key[neutral].gender, by_key[neutral].base_concept = "person", by_key[neutral].label
    for c in concepts:
        # Facing-right variants (ZWJ + 27a1) join the family of the concept they mirror.
        root = _neutral(c.key.replace("-200d-27a1", ""))
        c.family = root if root in by_key else c.key
    families: dict[str, list[Concept]] = {}
    for c in sorted(concepts, key=lambda c: c.order):
        families.setdefault(c.family, []).append(c)
    # One family in each run of five (in emojibase order) is unseen: the unseen set spreads over all
    # groups, and any --limit prefix holds about 20% unseen concepts too.
    rng = random.Random(f"clipforge-emoji-split:{seed}")
    order = list(families.values())
    for start in range(0, len(order), UNSEEN_ONE_IN):
        block = order[start:start + UNSEEN_ONE_IN]
        unseen = rng.randrange(len(block))
        for i, family in enumerate(block):
            for c in family:
                c.split = "unseen" if i == unseen else "seen"


def caption_candidates(concept: Concept, seed: int = 0, extra: int = 4) -> list[str]:
    """Captions for one concept: label, label + subgroup, and label + 1-3 seeded random tags (+ subgroup)."""
    rng = random.Random(f"clipforge-emoji-caption:{seed}:{concept.key}")
    label_words = set(_WORD.findall(concept.label.lower()))
    # Tags that repeat words of the label add nothing to a caption (concepts.csv keeps them all).
    tags = [t for t in concept.tags if not set(_WORD.findall(t.lower())) <= label_words]
    out = [concept.label]
    if concept.subgroup:
        out.append(f"{concept.label}, {concept.subgroup}")
    for _ in range(extra if tags else 0):
        parts = [concept.label, *rng.sample(tags, rng.randint(1, min(3, len(tags))))]
        if concept.subgroup and rng.random() < 0.5:
            parts.append(concept.subgroup)
        out.append(", ".join(dict.fromkeys(parts)))  # the subgroup may equal a tag ("smiling")
    unique = list(dict.fromkeys(t.replace("|", "/") for t in out))
    return [t for t in unique if not _has_style_word(t)] or [concept.label]


def render_emoji(source: Source, size: int) -> Image.Image:
    """One emoji image on white at size x size."""
    if isinstance(source, Path) and source.suffix.lower() == ".png":
        with Image.open(source) as image:
            image.load()
            return to_size(image, size)
    if isinstance(source, Path):
        return to_size(render_svg(source, width=size, height=size), size)
    width, height = (float(v) for v in re.search(r'width="([\d.]+)" height="([\d.]+)"', source).groups())
    # Render the longer side at `size`; to_size pads the other one.
    options = {"width": size} if width >= height else {"height": size}
    return to_size(render_svg(source, **options), size)


def _parse_styles(styles: Sequence[str] | None) -> list[str]:
    chosen = list(STYLES) if not styles else [s.strip() for item in styles for s in item.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STYLES + EVAL_STYLES]
    if unknown:
        raise DataError(f"unknown emoji style(s) {unknown}; choose from {', '.join(STYLES)} "
                         f"(evaluation only: {', '.join(EVAL_STYLES)})")
    return [s for s in STYLES + EVAL_STYLES if s in chosen]  # canonical order


# Index files read before anything else; images are extracted afterwards, only for the kept concepts.
INDEX_MEMBERS = {
    "google": ["package/emoji.json"], "twitter": ["package/emoji.json"], "openmoji": ["package/data/openmoji.json"],
    "fluent-flat": ["package/icons.json", "package/chars.json"], "fluent-3d": ["package/icons.json"],
    "emojibase": ["package/en/data.json", "package/en/messages.json"],
    **{style: ["package/icons.json", "package/chars.json"] for style in EVAL_STYLES},
}
STYLE_PACKAGE = {"google": "google", "twitter": "twitter", "openmoji-color": "openmoji", "openmoji-black": "openmoji",
                 "fluent-flat": "fluent-flat", "fluent-3d": "fluent-3d", **{s: s for s in EVAL_STYLES}}


def _unpack(key: str, tarballs: dict, tmp: Path, keep: Callable[[str], bool], cache: Path) -> None:
    package = PACKAGES[key] if key in PACKAGES else EVAL_PACKAGES[key]
    path = tarballs[package][0]
    safe_extract(path, tmp / key, keep, hint=f"Delete {path} and rerun, or run `npm pack {package.spec}` in {cache}.")


def build_emoji(root: Path, size: int = 64, styles: Sequence[str] | None = None, limit: int | None = None,
                cache: Path | None = None, seed: int = 0, force: bool = False, progress: bool = True,
                languages: Sequence[str] | None = None) -> dict:
    """Build ROOT/emoji (module docstring; `languages`: CLDR names per language, clipforge.corpora.cldr); returns
    the manifest, with "up_to_date": True when nothing was done."""
    root = Path(root)
    chosen, langs = _parse_styles(styles), parse_languages(languages)
    if size < 8 or (limit is not None and limit < 1):
        raise DataError("--size must be >= 8 and --limit >= 1")
    evals = [s for s in chosen if s in EVAL_STYLES]
    packages = {**PACKAGES, **{s: EVAL_PACKAGES[s] for s in evals}}
    cldr = list(CLDR_PACKAGES) if langs else []  # absent from a build without languages: its options stay as they were
    options = _options(size, chosen, limit, seed, [*packages.values(), *cldr], langs)
    existing = read_manifest(root / "emoji")
    if not force and existing is not None and existing.get("options") == options:
        return {**existing, "up_to_date": True}
    start = time.perf_counter()
    cache = Path(cache) if cache is not None else root / ".cache"
    tarballs = fetch_npm([*packages.values(), *cldr], cache)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".emoji-src-") as tmp:
        for key in tqdm(packages, desc="indexes", disable=not progress or None):
            _unpack(key, tarballs, Path(tmp), prefix_filter(INDEX_MEMBERS[key]), cache)
        src = {key: Path(tmp) / key / "package" for key in packages}
        concepts, indexes, eval_indexes = _read_sources(src, evals, cache)
        common = [c for c in concepts.values() if all(c.key in index for index in indexes.values())]
        common.sort(key=lambda c: c.order)
        assign_families_and_split(common, seed)  # on the full list: --limit keeps the full build's split
        kept = common[:limit] if limit else common
        if not kept:
            raise DatasetError("no emoji concept is present in all six styles: wrong package contents?")
        indexes.update(eval_indexes)  # after `common`: evaluation styles never decide the concept list
        for key in tqdm(sorted({STYLE_PACKAGE[s] for s in chosen}), desc="images", disable=not progress or None):
            wanted = {source.relative_to(Path(tmp) / key).as_posix() for s in chosen if STYLE_PACKAGE[s] == key
                      for c in kept if isinstance(source := indexes[s].get(c.key), Path)}
            if wanted:
                _unpack(key, tarballs, Path(tmp), wanted.__contains__, cache)
        for package, wanted in zip(cldr, members(langs)):
            safe_extract(tarballs[package][0], Path(tmp) / package.name, wanted.__contains__)
        with atomic_dataset(root, "emoji") as out:
            counts = _write_images(out, kept, indexes, chosen, size, progress)
            rows = _write_tables(out, kept, chosen, seed, indexes)
            named = write_language_tables(out, [Path(tmp) / p.name / "package" for p in cldr], langs, kept, rows, seed)
            manifest = {
                "dataset": "emoji", "options": options, "clipforge_version": clipforge_version(),
                "image_size": size, "split_seed": seed, "styles": chosen,
                "concepts": len(kept), "concepts_in_all_styles": len(common),
                "seen": sum(c.split == "seen" for c in kept), "unseen": sum(c.split == "unseen" for c in kept),
                "images_per_style": counts, "images": sum(counts.values()),
                "packages": {p.name: {"version": p.version, "tarball": p.tarball, "sha256": tarballs[p][1]}
                             for p in [*packages.values(), *cldr]},
                **({"eval_styles": evals} if evals else {}), **({"languages": named} if langs else {}),
                "build_seconds": round(time.perf_counter() - start, 1),
            }
            write_json(out / "manifest.json", manifest)
    return {**manifest, "up_to_date": False}


def _options(size: int, styles: list[str], limit: int | None, seed: int, packages: list[NpmPackage],
             languages: list[str]) -> dict:
    """What a build is made of; an existing build with the same options is up to date."""
    return {"builder_version": BUILDER_VERSION, "size": size, "styles": styles, "limit": limit, "seed": seed,
            "packages": {p.name: p.version for p in packages}, **({"languages": languages} if languages else {})}


def _read_sources(src: dict[str, Path], evals: list[str], cache: Path) -> tuple[dict, dict, dict]:
    """(concepts, each training style's index, each evaluation style's index) from the unpacked index files."""
    try:
        concepts = load_concepts(src["emojibase"])
        indexes = style_indexes(src)
        eval_indexes = {s: eval_style_index(src[s] / "icons.json", src[s] / "chars.json", concepts) for s in evals}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"unexpected package contents ({type(error).__name__}: {error}); "
                           f"are the tarballs in {cache} the pinned versions?") from None
    return concepts, indexes, eval_indexes


def _write_images(out: Path, concepts: list[Concept], indexes: dict[str, dict[str, Source]],
                  styles: Sequence[str], size: int, progress: bool) -> dict[str, int]:
    counts = {}
    for style in styles:
        folder = out / "images" / style
        folder.mkdir(parents=True)
        present = [c for c in concepts if c.key in indexes[style]]  # all of them but in evaluation styles
        for c in tqdm(present, desc=style, disable=not progress or None):
            try:
                image = render_emoji(indexes[style][c.key], size)
            except (OSError, ValueError) as error:
                raise DatasetError(f"cannot render {style} {c.key} ({c.label}): {error}") from None
            image.save(folder / f"{c.key}.png")
        counts[style] = len(present)
    return counts


def _write_tables(out: Path, concepts: list[Concept], styles: Sequence[str], seed: int,
                  indexes: dict[str, dict[str, Source]]) -> list[tuple[str, Concept, str]]:
    header = ["hexcode", "label", "tags", "group", "subgroup", "split", "gender", "base_concept"]
    write_csv(out / "concepts.csv", header,
              ([c.key, c.label, "|".join(c.tags), c.group, c.subgroup, c.split, c.gender, c.base_concept]
               for c in concepts))
    captions = {c.key: "|".join(caption_candidates(c, seed)) for c in concepts}
    rows = [(f"images/{style}/{c.key}.png", c, style) for style in styles for c in concepts if c.key in indexes[style]]
    write_csv(out / "captions.csv", ["image", "caption", "key", "style", "split"],
              ((image, captions[c.key], c.key, style, c.split) for image, c, style in rows))
    class_index = {c.key: i for i, c in enumerate(concepts)}
    write_csv(out / "labels.csv", ["image", "label", "class_index", "style", "split"],
              ((image, c.label, class_index[c.key], style, c.split) for image, c, style in rows))
    return rows

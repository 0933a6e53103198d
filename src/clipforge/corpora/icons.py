"""Icons dataset: curated Iconify sets (npm `@iconify/json`, pinned) rendered black on white, captioned from names.

Curation, each rule a named function (counts per rule in manifest.json):

    sets   restricted_licence (non-commercial, GPL, unknown), hidden_set (flagged hidden or uncategorised),
           emoji_set (evaluation styles elsewhere), excluded_category (Logos, Programming),
           lookalike_sibling (LOOKALIKES), code_named_set (flags named by ISO code)
    icons  hidden_icon (deprecated names), brand_icon ("brand-github", the set's own logo), animated_icon
           (SMIL: the static frame is half drawn), no_words, keep_variants (N style variants per set and
           stem), deduplicate (same drawing in two sets), exclude_concepts (--exclude-labels), blank renders
           (< 0.5% ink), unrenderable (resvg fails)

Layout written under ROOT/icons (atomically, via ROOT/.icons.tmp):

    images/<set>/<name>.png  RGB on white, SIZE x SIZE
    captions.csv    image, caption (candidates joined by '|': words, words + "icon", + style, + category,
                    aliases; never the set name), key (the stem: one concept), set, style
    excluded.csv    set, name, key, label: icons removed by --exclude-labels
    ATTRIBUTION.md  name, author, licence and URL of every kept set
    manifest.json   options, package version and sha256, counts per rule, kept icons/sets/stems
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Container, Iterable, Sequence

from tqdm import tqdm

from clipforge.corpora.emoji import iconify_svg
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
from clipforge.corpora.svg import BLANK_INK, drawing_hash, render_many
from clipforge.errors import DataError

BUILDER_VERSION = 1
PACKAGE = NpmPackage("@iconify/json", "2.2.535", "1a545f86fa224d6531d8fb101dcbe83aac2b28689a21cbed6fc68318a5af4d91")
DROP_CATEGORIES = frozenset({"Logos", "Programming"})  # brand marks and file-type badges: names, not concepts
EMOJI_MARKERS = ("emoji", "twemoji", "openmoji", "noto", "fxemoji", "emojione")
# Look-alike siblings: the same drawings as a kept set, changed only in weight, colour or version. Keeping
# both would show the model near-copies under one caption (and as each other's negatives in other batches).
LOOKALIKES = {
    "material-symbols-light": "material-symbols",  # the same glyphs at a lighter stroke weight
    "fa": "fa7-solid", "fa-solid": "fa7-solid", "fa-regular": "fa7-regular", "fa-brands": "fa7-brands",
    "fa6-solid": "fa7-solid", "fa6-regular": "fa7-regular", "fa6-brands": "fa7-brands",  # Font Awesome 4-6
    "heroicons-outline": "heroicons", "heroicons-solid": "heroicons",  # HeroIcons v1
    "bx": "boxicons", "bxs": "boxicons",  # BoxIcons v2 (boxicons is v3)
    "icon-park": "icon-park-outline", "icon-park-twotone": "icon-park-outline",  # the outlines, colour-filled
    "pepicons-pencil": "pepicons-pop",  # the same icons with a thinner pen
}
CODE_NAMED = frozenset({"flag", "circle-flags", "flagpack", "cif"})  # names are ISO codes ("fr"): no caption
# Trailing words that always name a style, and ones that do only when the set also has the icon without
# them or in another style ("heart-fill" next to "heart"; "format-bold" stays in a set without "format").
STYLE_SUFFIXES = frozenset({"outline", "outlined", "filled", "solid", "duotone", "twotone"})
GENERIC_STYLES = STYLE_SUFFIXES | {"fill", "line", "linear", "thin", "light", "bold", "sharp", "rounded", "round",
                                   "stroke", "broken", "o", "f"}  # "star-o", "chevron-f": Font Awesome 4 and Jam
STYLE_WORDS = {"outline": "outline", "outlined": "outline", "filled": "filled", "fill": "filled", "solid": "solid",
               "baseline": "filled", "duotone": "duotone", "duo": "duotone", "twotone": "two-tone", "two": "two-tone",
               "line": "line", "linear": "line", "stroke": "line", "thin": "thin", "light": "light", "bold": "bold",
               "sharp": "sharp", "rounded": "rounded", "round": "rounded", "broken": "broken", "flat": "flat",
               "o": "outline", "f": "filled"}
ABBREVIATIONS = {
    "btn": "button", "img": "image", "pic": "picture", "msg": "message", "msgs": "messages", "doc": "document",
    "docs": "documents", "nav": "navigation", "info": "information", "pwd": "password", "cal": "calendar",
    "bg": "background", "ctrl": "control", "del": "delete", "prev": "previous", "mic": "microphone",
    "vol": "volume", "usr": "user", "pref": "preferences", "prefs": "preferences", "calc": "calculator",
    "num": "number", "arr": "arrow", "addr": "address", "acct": "account", "cmd": "command", "db": "database",
    "dir": "directory", "err": "error", "fav": "favorite", "lib": "library", "loc": "location",
    "notif": "notification", "qty": "quantity", "tel": "telephone", "txt": "text", "vid": "video",
    "fwd": "forward", "chk": "check", "mgmt": "management", "org": "organization", "sync": "synchronize",
    "desc": "descending", "asc": "ascending", "vert": "vertical", "horiz": "horizontal", "sq": "square",
    "rect": "rectangle", "ppl": "people",
}
BRAND_MARKERS = frozenset({"brand", "logo", "logos"})  # tabler "brand-*", ionicons "logo-*": trademarks
# Icon categories that say nothing about the drawing.
CATEGORY_STOP = frozenset({"interface", "interfaces", "interface essential", "user interface", "ui", "ui actions",
                           "general", "other", "others", "misc", "miscellaneous", "essential", "common", "core",
                           "base", "basic", "components", "regular", "system", "default", "actions", "action",
                           "operate", "brand", "brands", "logos", "brand logos", "brand and logo", "emoji",
                           "emojis", "uncategorized", "icons", ""})
_CATEGORY_STOP_WORDS = frozenset({"interface", "brand", "logo", "logos", "icons", "newicons", "new"})
_TOKEN = re.compile(r"[a-z0-9]+")
_SIZE = re.compile(r"\d+|\d+px|\d+x\d+|x?xs|sm|lg|x*l")  # sizes and plain numbers say nothing drawable
_NUMBERED = re.compile(r"^([a-z]{4,})\d+$")  # four letters or more: "mp3", "h264", "ipv6" stay
_ALTERNATIVE = re.compile(r"alt\d*|variant|v\d+")  # "user-alt", "shield-variant": another drawing, same concept


@dataclass
class Icon:
    """One icon kept for rendering, with the words its captions are built from."""

    prefix: str
    name: str
    key: str  # the stem's words joined by '-': one concept across sets and variants
    style: str  # style words from the removed affix ("outline"), '' when none
    svg: str
    categories: list[str] = field(default_factory=list)
    synonyms: list[str] = field(default_factory=list)  # caption words of aliases and identical drawings
    rank: tuple = ()


def name_words(text: str) -> list[str]:
    """Caption words of a name: numbers, sizes and alternative markers dropped, abbreviations expanded."""
    words = []
    for token in _TOKEN.findall(text.lower()):
        token = _NUMBERED.sub(r"\1", token)  # "health3", "arrow2": numbered drawings of one concept
        if not _SIZE.fullmatch(token) and not _ALTERNATIVE.fullmatch(token):
            words.extend(ABBREVIATIONS.get(token, token).split())
    return words


def concept_key(text: str) -> str:
    """The key a label or icon name matches on ("Grinning face" -> "grinning-face")."""
    return "-".join(name_words(text))


def style_caption(label: str) -> str:
    """Style words of an Iconify style label ("Outline Rounded" -> "outline rounded", "Regular" -> "")."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label).lower()
    return " ".join(dict.fromkeys(STYLE_WORDS[w] for w in re.findall(r"[a-z]+", spaced) if w in STYLE_WORDS))


def category_caption(category: str) -> str:
    """A set category as caption words ("MoneyPaymentsFinance" -> "money payments finance"); '' when useless."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", category).replace("&", " and ").replace("/", " and ")
    text = " ".join(w for w in re.findall(r"[a-z]+", spaced.replace("+", " and ").lower()))
    return "" if text in CATEGORY_STOP or set(text.split()) & _CATEGORY_STOP_WORDS else text


# Set rules: (prefix, info) -> True to drop the whole set.
def restricted_licence(prefix: str, info: dict) -> bool:
    """Non-commercial (CC-BY-NC*), GPL-family (copyleft over the whole dataset) or unknown licence."""
    spdx = str(info.get("license", {}).get("spdx", ""))
    return not spdx or bool(re.search(r"(^|-)NC(-|$)", spdx)) or bool(re.match(r"[AL]?GPL", spdx))


def hidden_set(prefix: str, info: dict) -> bool:
    """Flagged hidden (deprecated or replaced) or without a category (unlisted in Iconify's index)."""
    return bool(info.get("hidden")) or not info.get("category")


def emoji_set(prefix: str, info: dict) -> bool:
    """Emoji art: the emoji dataset's evaluation styles, or copies of its training art."""
    return info.get("category") == "Emoji" or any(marker in prefix for marker in EMOJI_MARKERS)


def excluded_category(prefix: str, info: dict) -> bool:
    """Brand logos and programming (file-type) icons: proper names, not drawable concepts."""
    return info.get("category") in DROP_CATEGORIES


def lookalike_sibling(prefix: str, info: dict) -> bool:
    """A near-copy of a kept set (LOOKALIKES)."""
    return prefix in LOOKALIKES


def code_named_set(prefix: str, info: dict) -> bool:
    """Flag sets whose icon names are ISO codes."""
    return prefix in CODE_NAMED


ICON_RULES = ("hidden_icon", "brand", "unrenderable", "animated", "no_words", "variants", "duplicate",
              "excluded_label", "limit", "blank")  # the order of manifest.json's dropped_icons
SET_RULES: tuple[tuple[str, Callable[[str, dict], bool]], ...] = (
    ("licence", restricted_licence), ("hidden_set", hidden_set), ("emoji", emoji_set),
    ("category", excluded_category), ("lookalike", lookalike_sibling), ("code_names", code_named_set))


def hidden_icon(entry: dict) -> bool:
    """A deprecated name Iconify keeps only for old links."""
    return bool(entry.get("hidden"))


def set_words(set_name: str) -> list[str]:
    """The words of a set's name that name the set ("Bootstrap Icons" -> ["bootstrap"])."""
    return [w for w in name_words(set_name) if w not in STYLE_WORDS and w not in ("icons", "icon", "free")]


def brand_icon(words: Sequence[str], own: Sequence[str], prefix: str) -> bool:
    """A trademark: "brand-github", "logo-apple", "profisafe-logo", or the set's own name (set_words, prefix)."""
    return bool(words) and (words[0] in BRAND_MARKERS or words[-1] in BRAND_MARKERS or list(words) == list(own)
                            or prefix in words)  # "carbon-for-ibm" in carbon, "mingcute-fill": never the set name


def animated_icon(svg: str) -> bool:
    """SMIL-animated drawing: resvg shows the first frame, which is often half drawn."""
    return "<animate" in svg or "<set " in svg


def split_style(name: str, bases: Container[str], suffixes: dict, prefixes: dict) -> tuple[str, str]:
    """(base name, style label): declared style prefix/suffix, else a generic style word with a sibling in bases."""
    style = ""
    for p in sorted(prefixes, key=len, reverse=True):
        if p and name.startswith(p + "-"):
            name, style = name[len(p) + 1:], prefixes[p]
            break
    for s in sorted(suffixes, key=len, reverse=True):
        if s and name.endswith("-" + s):
            name, style = name[:-len(s) - 1], suffixes[s]
            break
    else:
        style = style or suffixes.get("", "")
    head, _, last = name.rpartition("-")
    sibling = head in bases or any(f"{head}-{w}" in bases for w in GENERIC_STYLES if w != last)
    if head and (last in STYLE_SUFFIXES or (last in GENERIC_STYLES and sibling)):
        return head, f"{last} {style}".strip()
    return name, style


def _declared_base(name: str, suffixes: dict, prefixes: dict) -> str:
    return split_style(name, (), suffixes, prefixes)[0]


def _size_penalty(style: str) -> int:
    sizes = [int(n) for n in re.findall(r"\d+", style)]
    return abs(sizes[0] - 24) if sizes else 0  # 24 px masters are the most detailed of small sizes


def set_icons(icon_set: dict, drops: Counter) -> list[Icon]:
    """The renderable icons of one Iconify set, with words, style, categories and aliases; drops counted."""
    prefix, icons = icon_set["prefix"], icon_set.get("icons", {})
    suffixes, prefixes = icon_set.get("suffixes") or {}, icon_set.get("prefixes") or {}
    bases = {_declared_base(n, suffixes, prefixes) for n in icons}
    categories: dict[str, list[str]] = {}
    for category, names in (icon_set.get("categories") or {}).items():
        caption = category_caption(category)
        for name in names if caption else ():
            categories.setdefault(name, []).append(caption)
    synonyms: dict[str, list[str]] = {}
    own = set_words(icon_set.get("info", {}).get("name", prefix))
    for alias, entry in (icon_set.get("aliases") or {}).items():
        if set(entry) == {"parent"}:  # flipped or rotated aliases are other drawings, not synonyms
            words = name_words(split_style(alias, bases, suffixes, prefixes)[0])
            if not brand_icon(words, own, prefix):
                synonyms.setdefault(_alias_root(icon_set, alias), []).append(" ".join(words))
    out = []
    for name, entry in icons.items():
        svg = iconify_svg(icon_set, name)
        base, style = split_style(name, bases, suffixes, prefixes)
        words = name_words(base)
        reason = ("hidden_icon" if hidden_icon(entry) else "brand" if brand_icon(words, own, prefix) else
                  "unrenderable" if svg is None else "animated" if animated_icon(svg) else "")
        if reason or not words:
            drops[reason or "no_words"] += 1
            continue
        out.append(Icon(prefix, name, "-".join(words), style_caption(style), svg,
                        list(dict.fromkeys(categories.get(name, []))), synonyms.get(name, []),
                        (_size_penalty(style), hashlib.md5(f"{prefix}:{name}".encode()).hexdigest())))
    by_key: dict[str, list[str]] = {}  # an alias of "home" names every style variant of home
    for icon in out:
        by_key.setdefault(icon.key, []).extend(icon.synonyms)
    for icon in out:
        icon.synonyms = [s for s in dict.fromkeys(by_key[icon.key]) if _new_words(s, icon.key.split("-"))]
    return out


def _new_words(synonym: str, words: list[str]) -> bool:
    """A synonym says more than the icon's own words, style words aside ("heart outline" for "heart": no)."""
    return bool(synonym) and [w for w in synonym.split() if w not in STYLE_WORDS] != words


def _alias_root(icon_set: dict, name: str) -> str:
    aliases = icon_set.get("aliases") or {}
    for _ in range(8):  # chains are short; the bound guards against a cycle
        if name not in aliases:
            break
        name = aliases[name]["parent"]
    return name


def keep_variants(icons: Sequence[Icon], n: int) -> tuple[list[Icon], int]:
    """Up to n style variants per (set, key), preferring 24 px masters, then a name hash (mixes styles)."""
    groups: dict[tuple[str, str], list[Icon]] = {}
    for icon in icons:
        groups.setdefault((icon.prefix, icon.key), []).append(icon)
    kept = [i for group in groups.values() for i in sorted(group, key=lambda i: i.rank)[:n]]
    kept.sort(key=lambda i: (i.prefix, i.name))
    return kept, len(icons) - len(kept)


def deduplicate(icons: Sequence[Icon]) -> tuple[list[Icon], int]:
    """The first icon of every identical drawing; the others' words become its synonyms."""
    first: dict[str, Icon] = {}
    for icon in icons:
        kept = first.setdefault(drawing_hash(icon.svg), icon)
        if kept is not icon:
            extra = [icon.key.replace("-", " "), *icon.synonyms]
            kept.synonyms = list(dict.fromkeys(kept.synonyms + [s for s in extra if s != kept.key.replace("-", " ")]))
    return list(first.values()), len(icons) - len(first)


def exclude_concepts(icons: Sequence[Icon], labels: Iterable[str]) -> tuple[list[Icon], list[tuple[Icon, str]]]:
    """Icons whose key or any synonym matches a label (concept_key), split off with the label they match."""
    wanted = {concept_key(label): label for label in labels if concept_key(label)}
    kept, removed = [], []
    for icon in icons:
        hits = [wanted[k] for k in [icon.key, *(s.replace(" ", "-") for s in icon.synonyms)] if k in wanted]
        if hits:
            removed.append((icon, hits[0]))
        else:
            kept.append(icon)
    return kept, removed


def icon_captions(icon: Icon) -> list[str]:
    """Caption candidates: words, words + "icon", + style, + up to two categories, up to three synonyms."""
    words = icon.key.replace("-", " ")
    out = [words, f"{words} icon"] + ([f"{words}, {icon.style} icon"] if icon.style else [])
    out += [f"{words}, {c}" for c in icon.categories[:2] if c != words] + icon.synonyms[:3]
    return list(dict.fromkeys(c.replace("|", "/") for c in out))


def read_labels(path: Path) -> list[str]:
    """Concept labels from a text file (one per line, '#' comments) or a CSV with a 'label' column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read the label file {path}: {error}") from None
    if Path(path).suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "label" not in rows[0]:
            raise DatasetError(f"{path}: a CSV of labels needs a 'label' column")
        return [r["label"] for r in rows]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def curate(json_dir: Path, variants: int, exclude: Sequence[str], limit: int | None,
           progress: bool) -> tuple[list[Icon], list[tuple[Icon, str]], dict[str, dict], dict]:
    """(kept icons, removed (icon, label) pairs, kept set infos, counts per rule) from unpacked Iconify JSON."""
    dropped_sets = {rule: {"sets": 0, "icons": 0, "prefixes": []} for rule, _ in SET_RULES}
    drops: Counter = Counter()
    icons, infos = [], {}
    files = sorted(json_dir.glob("*.json"))
    if not files:
        raise DatasetError(f"no Iconify sets in {json_dir}: is the tarball {PACKAGE.spec}?")
    for path in tqdm(files, desc="sets", disable=not progress or None):
        try:
            icon_set = json.loads(path.read_text(encoding="utf-8"))
            prefix, info = icon_set["prefix"], icon_set.get("info", {})
        except (OSError, ValueError, KeyError) as error:
            raise DatasetError(f"{path.name} in {PACKAGE.spec} is unreadable ({error}): delete the cached "
                               f"tarball and rerun") from None
        rule = next((name for name, test in SET_RULES if test(prefix, info)), None)
        if rule:
            entry = dropped_sets[rule]
            entry["sets"], entry["icons"] = entry["sets"] + 1, entry["icons"] + len(icon_set.get("icons", {}))
            entry["prefixes"].append(prefix)
            continue
        infos[prefix] = info
        icons += set_icons(icon_set, drops)
    total = len(icons) + sum(drops.values())
    icons, drops["variants"] = keep_variants(icons, variants)
    icons, drops["duplicate"] = deduplicate(icons)
    icons, removed = exclude_concepts(icons, exclude)
    drops["excluded_label"] = len(removed)
    if limit is not None and len(icons) > limit:  # spread over the sets, not the first few sets only
        drops["limit"] = len(icons) - limit
        icons = [icons[i * len(icons) // limit] for i in range(limit)]
    return icons, removed, infos, {"sets": dropped_sets, "icons": dict(drops), "icons_in_kept_sets": total}


def build_icons(root: Path, size: int = 64, variants: int = 1, exclude_labels: Iterable[str] = (),
                limit: int | None = None, cache: Path | None = None, workers: int | None = None,
                force: bool = False, progress: bool = True) -> dict:
    """Build ROOT/icons (module docstring); returns the manifest, with "up_to_date": True when nothing was done."""
    root = Path(root)
    if size < 8 or variants < 1 or (limit is not None and limit < 1):
        raise DataError("--size must be >= 8, --variants >= 1 and --limit >= 1")
    exclude = sorted({label.strip() for label in exclude_labels if label.strip()})
    options = {"builder_version": BUILDER_VERSION, "size": size, "variants": variants, "limit": limit,
               "exclude_labels": hashlib.sha256("\n".join(exclude).encode()).hexdigest()[:16] if exclude else None,
               "package": PACKAGE.spec}
    existing = read_manifest(root / "icons")
    if not force and existing is not None and existing.get("options") == options:
        return {**existing, "up_to_date": True}
    start = time.perf_counter()
    cache = Path(cache) if cache is not None else root / ".cache"
    tarball, digest = fetch_npm([PACKAGE], cache)[PACKAGE]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".icons-src-") as tmp:
        safe_extract(tarball, Path(tmp), prefix_filter(["package/json/"]),
                     hint=f"Delete {tarball} and rerun, or run `npm pack {PACKAGE.spec}` in {cache}.")
        icons, removed, infos, counts = curate(Path(tmp) / "package" / "json", variants, exclude, limit, progress)
    with atomic_dataset(root, "icons") as out:
        jobs = [(i.svg, str(out / "images" / i.prefix / f"{i.name}.png"), size) for i in icons]
        inks = render_many(jobs, workers or min(2, os.cpu_count() or 1), progress)
        drops = Counter(counts["icons"]) + Counter(unrenderable=sum(i < 0 for i in inks),
                                                   blank=sum(0 <= i < BLANK_INK for i in inks))
        kept = [icon for icon, ink in zip(icons, inks) if ink >= BLANK_INK]
        if not kept:
            raise DatasetError("no icon survived curation and rendering: wrong package contents?")
        per_set = Counter(i.prefix for i in kept)
        write_csv(out / "captions.csv", ["image", "caption", "key", "set", "style"],
                  ([f"images/{i.prefix}/{i.name}.png", "|".join(icon_captions(i)), i.key, i.prefix, i.style]
                   for i in kept))
        write_csv(out / "excluded.csv", ["set", "name", "key", "label"],
                  ([i.prefix, i.name, i.key, label] for i, label in removed))
        (out / "ATTRIBUTION.md").write_text(attribution({p: infos[p] for p in sorted(per_set)}, per_set))
        manifest = {
            "dataset": "icons", "options": options, "clipforge_version": clipforge_version(), "image_size": size,
            "package": {"name": PACKAGE.name, "version": PACKAGE.version, "tarball": PACKAGE.tarball,
                        "sha256": digest},
            "icons": len(kept), "sets": len(per_set), "stems": len({i.key for i in kept}),
            "dropped_sets": counts["sets"], "dropped_icons": {rule: drops[rule] for rule in ICON_RULES},
            "icons_in_kept_sets": counts["icons_in_kept_sets"], "excluded_labels": len(exclude),
            "icons_per_set": dict(sorted(per_set.items())), "build_seconds": round(time.perf_counter() - start, 1),
        }
        write_json(out / "manifest.json", manifest)
    return {**manifest, "up_to_date": False}


def attribution(infos: dict[str, dict], per_set: Counter) -> str:
    """ATTRIBUTION.md: one line per kept set with its name, author, licence and their URLs."""
    lines = [f"# Icon attribution\n\nIcons from {len(infos)} Iconify sets (npm `{PACKAGE.spec}`), rendered to PNG "
             f"(currentColor as black) and otherwise unchanged. Each set keeps its own licence:\n"]
    for prefix, info in infos.items():
        author, licence = info.get("author", {}), info.get("license", {})
        by = f"[{author.get('name', '?')}]({author['url']})" if author.get("url") else author.get("name", "?")
        lic = licence.get("title") or licence.get("spdx", "?")
        lic = f"[{lic}]({licence['url']})" if licence.get("url") else lic
        lines.append(f"- **{info.get('name', prefix)}** (`{prefix}`, {per_set[prefix]} icons) by {by}; "
                     f"licence {lic} (`{licence.get('spdx', '?')}`)")
    return "\n".join(lines) + "\n"

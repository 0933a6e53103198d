"""The demo's data: the emoji and Tux Paint sets (built once, then cached) and its training caption file."""
from __future__ import annotations

import csv
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from clipforge.corpora import build_emoji, build_icons, build_tuxpaint
from clipforge.corpora.icons import concept_key
from clipforge.errors import DataError
from clipforge.inference.templates import get_templates

# Sentences around the label: the training captions hold them (the way web captions are sentences),
# so the zero-shot ensemble (the same "emoji" set) prompts in forms the text tower saw. A first run
# with 3 of the 8 ensemble templates missing from training had the ensemble below the bare label.
TRAIN_TEMPLATES = tuple(get_templates("emoji"))
if TYPE_CHECKING:
    from clipforge.demo.config import DemoConfig

ICON_STYLE = "icons"  # the style column of icon rows in the training CSV (the supervised baseline skips them)
ICONS_PER_CONCEPT_LIMIT = 5  # with --limit N (smoke runs), build N x this many icons


@dataclass
class DemoData:
    """Where the demo's datasets are, and how long preparing them took."""

    emoji: Path
    tuxpaint: Path
    seconds: float
    fetched: bool  # False when all were already built (cache hit)
    icons: Path | None = None  # the Iconify "web" corpus, when the run trains on it


def prepare_datasets(root: Path, limit: int | None = None, cache: Path | None = None, progress: bool = True,
                     icons: bool = False, styles: list[str] | None = None) -> DemoData:
    """Build (or find, when up to date) ROOT/emoji (`styles`, first `limit` concepts), ROOT/tuxpaint and ROOT/icons."""
    start = time.perf_counter()
    # Korean names too (CLDR, two small npm packages): the binding section's second language; built always, so the
    # default run and `--binding 1` share one emoji build
    emoji = build_emoji(root, styles=styles, limit=limit, cache=cache, progress=progress, languages=["ko"])
    tux = build_tuxpaint(root, cache=cache, progress=progress)  # small; a limit would leave too few categories
    built = [emoji, tux]
    if icons:
        built.append(build_icons(root, limit=limit * ICONS_PER_CONCEPT_LIMIT if limit else None, cache=cache,
                                 progress=progress))
    fetched = not all(m.get("up_to_date") for m in built)
    return DemoData(root / "emoji", root / "tuxpaint", time.perf_counter() - start, fetched,
                    root / "icons" if icons else None)


def icon_rows(icons: Path, count: int, seed: int, exclude_labels: Sequence[str] = (),
              query: dict[str, str] | None = None, per_concept: int = 0) -> tuple[list[list[str]], int]:
    """Up to `count` icons drawn by `seed` as training rows (image, captions, key, style), and how many were excluded.

    An icon is excluded when its key or one of its caption candidates is the key of a label in
    `exclude_labels` (the unseen concepts, for the "icons removed" setting). With `query` (concept key ->
    emoji hexcode: the query list, as CLIP's corpus was collected by searching for known words), only icons
    named like a query are drawn, and they take the emoji's key, so an icon and an emoji of one concept are
    never each other's negatives. `per_concept` > 0 caps the icons drawn per key (a popular name like
    "calendar" has 110 icons; uncapped, a few concepts would take most of the icon draws).
    """
    excluded_keys = {concept_key(label) for label in exclude_labels} - {""}
    with open(icons / "captions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    names = [{r["key"], *(concept_key(c) for c in r["caption"].split("|"))} for r in rows]
    kept = [(r, n) for r, n in zip(rows, names) if not n & excluded_keys]
    excluded = len(rows) - len(kept)
    if query is not None:
        kept = [(r, n) for r, n in kept if n & query.keys()]
    random.Random(seed).shuffle(kept)

    def key(row: dict[str, str], names: set[str]) -> str:
        # Icon keys get a prefix: "cat" the icon stem and an emoji hexcode never collide.
        matches = sorted(names & query.keys()) if query else []
        return query[row["key"] if row["key"] in matches else matches[0]] if matches else f"icon:{row['key']}"

    drawn: dict[str, int] = {}
    chosen = []
    for row, row_names in kept:
        row_key = key(row, row_names)
        if len(chosen) < count and (not per_concept or drawn.get(row_key, 0) < per_concept):
            drawn[row_key] = drawn.get(row_key, 0) + 1
            chosen.append([str((icons / row["image"]).resolve()), row["caption"], row_key, ICON_STYLE])
    return sorted(chosen), excluded


def label_query(concepts: list[dict[str, str]]) -> dict[str, str]:
    """The query list of the "labels" icon selection: each emoji concept's key ("grinning-face") -> its hexcode."""
    return {concept_key(c["label"]): c["hexcode"] for c in concepts if concept_key(c["label"])}


def demo_icon_rows(icons: Path | None, count: int, query: str, per_concept: int, unseen: str, seed: int,
                   concepts: list[dict[str, str]]) -> tuple[list[list[str]], int]:
    """The demo's icon rows: `count` icons by the `query` rule ("labels" / "any"), unseen-named ones kept or removed."""
    if icons is None or count == 0:
        return [], 0
    unseen_labels = [c["label"] for c in concepts if c["split"] == "unseen"] if unseen == "remove" else []
    return icon_rows(icons, count, seed, unseen_labels, label_query(concepts) if query == "labels" else None,
                     per_concept)


def clip_table(cfg: "DemoConfig", emoji: Path, icons: Path | None, concepts: list[dict[str, str]], id_test: set,
               out_csv: Path, count: int, unseen: str) -> tuple[int, int, int]:
    """Write CLIP's training CSV for one data setting (`count` icons, unseen-named ones kept / removed).

    Returns (emoji rows, icons, icons excluded as named like unseen concepts).
    """
    rows, excluded = demo_icon_rows(icons, count, cfg.icon_query, cfg.icons_per_concept, unseen, cfg.seed, concepts)
    pairs = training_captions(emoji, cfg.styles("train"), "seen", out_csv, cfg.seed, exclude=id_test, extra_rows=rows,
                              repeat=cfg.emoji_repeat if rows else 1)
    return pairs, len(rows), excluded


def read_concepts(emoji: Path) -> list[dict[str, str]]:
    """Rows of concepts.csv (hexcode, label, tags, group, subgroup, split, gender, base_concept)."""
    with open(emoji / "concepts.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def training_captions(emoji: Path, styles: list[str], split: str, out_csv: Path, seed: int,
                      exclude: set[tuple[str, str]] = frozenset(), templates: tuple[str, ...] = TRAIN_TEMPLATES,
                      extra_rows: list[list[str]] = (), repeat: int = 1) -> int:
    """Write the training CSV: one row per image of `split` in `styles`; '|'-separated caption candidates.

    Candidates = the dataset's captions (label, label + tags / subgroup) plus the label in each sentence
    template; the loader samples one per epoch. Image paths are absolute so the file can live anywhere.
    `exclude` holds (key, style) pairs kept out (in-distribution test images); `extra_rows` (icons) are
    appended as they are; each emoji row is written `repeat` times (its share of the draws when icons are
    many; one concept per batch still holds). Returns the number of distinct emoji rows.
    """
    with open(emoji / "captions.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle)
                if r["style"] in styles and r["split"] == split and (r["key"], r["style"]) not in exclude]
    if not rows:
        raise DataError(f"{emoji}: no {split} images in styles {styles}")
    labels = {c["hexcode"]: c["label"] for c in read_concepts(emoji)}
    rng = random.Random(seed)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "key", "style"])
        for row in rows:
            sentences = [t.format(labels[row["key"]]) for t in templates]
            candidates = row["caption"].split("|") + sentences
            rng.shuffle(candidates)  # order carries no meaning; shuffled once so the file is reproducible
            writer.writerows([[str((emoji / row["image"]).resolve()), "|".join(candidates), row["key"],
                               row["style"]]] * repeat)
        writer.writerows(extra_rows)
    return len(rows)

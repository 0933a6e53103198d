"""The demo's data: the emoji and Tux Paint sets (built once, then cached) and its training caption file."""
from __future__ import annotations

import csv
import random
import time
from dataclasses import dataclass
from pathlib import Path

from clipforge.datasets import build_emoji, build_icons, build_tuxpaint
from clipforge.datasets.icons import concept_key
from clipforge.evaluate.templates import get_templates

# Sentences around the label: the training captions hold them (the way web captions are sentences),
# so the zero-shot ensemble (the same "emoji" set) prompts in forms the text tower saw. A first run
# with 3 of the 8 ensemble templates missing from training had the ensemble below the bare label.
TRAIN_TEMPLATES = tuple(get_templates("emoji"))
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
    emoji = build_emoji(root, styles=styles, limit=limit, cache=cache, progress=progress)
    tux = build_tuxpaint(root, cache=cache, progress=progress)  # small; a limit would leave too few categories
    built = [emoji, tux]
    if icons:
        built.append(build_icons(root, limit=limit * ICONS_PER_CONCEPT_LIMIT if limit else None, cache=cache,
                                 progress=progress))
    fetched = not all(m.get("up_to_date") for m in built)
    return DemoData(root / "emoji", root / "tuxpaint", time.perf_counter() - start, fetched,
                    root / "icons" if icons else None)


def icon_rows(icons: Path, count: int, seed: int, exclude_labels: list[str] = ()) -> tuple[list[list[str]], int]:
    """`count` icons drawn by `seed` as training rows (image, captions, key, style), and how many were excluded.

    An icon is excluded when its key or one of its caption candidates is the key of a label in
    `exclude_labels` (the unseen concepts, for the "icons removed" setting).
    """
    excluded_keys = {concept_key(label) for label in exclude_labels} - {""}
    with open(icons / "captions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if not ({r["key"], *(concept_key(c) for c in r["caption"].split("|"))} & excluded_keys)]
    random.Random(seed).shuffle(kept)
    chosen = sorted(kept[:count], key=lambda r: r["image"])
    # Icon keys get a prefix: "cat" the icon stem and an emoji hexcode never collide.
    return ([[str((icons / r["image"]).resolve()), r["caption"], f"icon:{r['key']}", ICON_STYLE] for r in chosen],
            len(rows) - len(kept))


def read_concepts(emoji: Path) -> list[dict[str, str]]:
    """Rows of concepts.csv (hexcode, label, tags, group, subgroup, split, gender, base_concept)."""
    with open(emoji / "concepts.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def training_captions(emoji: Path, styles: list[str], split: str, out_csv: Path, seed: int,
                      exclude: set[tuple[str, str]] = frozenset(), templates: tuple[str, ...] = TRAIN_TEMPLATES,
                      extra_rows: list[list[str]] = ()) -> int:
    """Write the training CSV: one row per image of `split` in `styles`; '|'-separated caption candidates.

    Candidates = the dataset's captions (label, label + tags / subgroup) plus the label in each sentence
    template; the loader samples one per epoch. Image paths are absolute so the file can live anywhere.
    `exclude` holds (key, style) pairs kept out (in-distribution test images); `extra_rows` (icons) are
    appended as they are. Returns the number of emoji rows.
    """
    with open(emoji / "captions.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle)
                if r["style"] in styles and r["split"] == split and (r["key"], r["style"]) not in exclude]
    if not rows:
        raise ValueError(f"{emoji}: no {split} images in styles {styles}")
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
            writer.writerow([str((emoji / row["image"]).resolve()), "|".join(candidates), row["key"], row["style"]])
        writer.writerows(extra_rows)
    return len(rows)

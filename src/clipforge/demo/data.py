"""The demo's data: the emoji and Tux Paint sets (built once, then cached) and its training caption file."""
from __future__ import annotations

import csv
import random
import time
from dataclasses import dataclass
from pathlib import Path

from clipforge.datasets import build_emoji, build_tuxpaint
from clipforge.evaluate.templates import get_templates

# Sentences around the label: the training captions hold them (the way web captions are sentences),
# so the zero-shot ensemble (the same "emoji" set) prompts in forms the text tower saw. A first run
# with 3 of the 8 ensemble templates missing from training had the ensemble below the bare label.
TRAIN_TEMPLATES = tuple(get_templates("emoji"))


@dataclass
class DemoData:
    """Where the demo's datasets are, and how long preparing them took."""

    emoji: Path
    tuxpaint: Path
    seconds: float
    fetched: bool  # False when both were already built (cache hit)


def prepare_datasets(root: Path, limit: int | None = None, cache: Path | None = None, progress: bool = True) -> DemoData:
    """Build (or find, when up to date) ROOT/emoji (first `limit` concepts) and ROOT/tuxpaint (all 950 stamps)."""
    start = time.perf_counter()
    emoji = build_emoji(root, limit=limit, cache=cache, progress=progress)
    tux = build_tuxpaint(root, cache=cache, progress=progress)  # small; a limit would leave too few categories
    fetched = not (emoji.get("up_to_date") and tux.get("up_to_date"))
    return DemoData(root / "emoji", root / "tuxpaint", time.perf_counter() - start, fetched)


def read_concepts(emoji: Path) -> list[dict[str, str]]:
    """Rows of concepts.csv (hexcode, label, tags, group, subgroup, split, gender, base_concept)."""
    with open(emoji / "concepts.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def training_captions(emoji: Path, styles: list[str], split: str, out_csv: Path, seed: int,
                      exclude: set[tuple[str, str]] = frozenset(), templates: tuple[str, ...] = TRAIN_TEMPLATES) -> int:
    """Write the training CSV: one row per image of `split` in `styles`; '|'-separated caption candidates.

    Candidates = the dataset's captions (label, label + tags / subgroup) plus the label in each sentence
    template; the loader samples one per epoch. Image paths are absolute so the file can live anywhere.
    `exclude` holds (key, style) pairs kept out (in-distribution test images).
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
    return len(rows)

"""The demo's training table: which icons join pre-training, under which key, and the emoji rows' share."""
from __future__ import annotations

import csv
from pathlib import Path

from clipforge.demo.data import ICON_STYLE, icon_rows, label_query, training_captions

CONCEPTS = [  # hexcode, label, split
    ("1f415", "dog", "seen"), ("1f600", "grinning face", "unseen"), ("1f431", "cat face", "seen")]
ICONS = [  # image, caption candidates, key
    ("images/a/dog.png", "dog|dog icon|dog, animals", "dog"),
    ("images/b/dog-outline.png", "dog|outline icon", "dog"),
    ("images/a/puppy.png", "puppy|puppy icon|dog", "puppy"),  # an alias names the concept
    ("images/a/face-grin.png", "grinning face|grinning face icon", "grinning-face"),
    ("images/a/calendar.png", "calendar|calendar icon", "calendar"),
]


def _write(path: Path, header: list[str], rows: list[tuple]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])


def _icons(tmp_path: Path) -> Path:
    _write(tmp_path / "captions.csv", ["image", "caption", "key", "set", "style"], [(*r, "s", "") for r in ICONS])
    return tmp_path


def _concepts() -> list[dict[str, str]]:
    return [{"hexcode": h, "label": label, "split": split} for h, label, split in CONCEPTS]


def test_label_query_keeps_only_icons_named_like_a_concept_under_the_concept_key(tmp_path):
    rows, excluded = icon_rows(_icons(tmp_path), 100, seed=0, query=label_query(_concepts()))
    by_image = {Path(r[0]).name: r for r in rows}
    assert excluded == 0 and set(by_image) == {"dog.png", "dog-outline.png", "puppy.png", "face-grin.png"}
    # An icon of a concept shares the emoji's key, so the sampler never makes them each other's negatives.
    assert {by_image[n][2] for n in ("dog.png", "dog-outline.png", "puppy.png")} == {"1f415"}
    assert by_image["face-grin.png"][2] == "1f600" and all(r[3] == ICON_STYLE for r in rows)
    assert by_image["puppy.png"][1] == "puppy|puppy icon|dog"  # captions are the icon's own


def test_without_a_query_every_icon_is_drawn_under_its_own_prefixed_key(tmp_path):
    rows, _ = icon_rows(_icons(tmp_path), 100, seed=0)
    assert sorted(r[2] for r in rows) == ["icon:calendar", "icon:dog", "icon:dog", "icon:grinning-face", "icon:puppy"]
    assert len(icon_rows(_icons(tmp_path), 2, seed=0)[0]) == 2


def test_unseen_concepts_removed_drops_their_icons_before_the_query(tmp_path):
    rows, excluded = icon_rows(_icons(tmp_path), 100, seed=0, exclude_labels=["Grinning face"],
                               query=label_query(_concepts()))
    assert excluded == 1 and "face-grin.png" not in {Path(r[0]).name for r in rows} and len(rows) == 3


def test_training_captions_repeat_emoji_rows_and_append_icons(tmp_path):
    emoji = tmp_path / "emoji"
    emoji.mkdir()
    _write(emoji / "concepts.csv", ["hexcode", "label", "split"], CONCEPTS)
    _write(emoji / "captions.csv", ["image", "caption", "key", "style", "split"],
           [("google/1f415.png", "dog", "1f415", "google", "seen"),
            ("google/1f431.png", "cat face", "1f431", "google", "seen"),
            ("twitter/1f415.png", "dog", "1f415", "twitter", "seen")])
    icons = [["/x/dog.png", "dog", "1f415", ICON_STYLE]]
    out = tmp_path / "train.csv"
    assert training_captions(emoji, ["google"], "seen", out, seed=0, templates=("a {}",), extra_rows=icons,
                             repeat=3) == 2
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["key"] for r in rows] == ["1f415"] * 3 + ["1f431"] * 3 + ["1f415"]
    assert rows[-1]["style"] == ICON_STYLE and set(rows[0]["caption"].split("|")) == {"dog", "a dog"}


def test_per_concept_caps_the_icons_of_one_key(tmp_path):
    rows, _ = icon_rows(_icons(tmp_path), 100, seed=0, query=label_query(_concepts()), per_concept=1)
    assert sorted(r[2] for r in rows) == ["1f415", "1f600"]

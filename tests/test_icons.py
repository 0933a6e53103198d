"""`clipforge data icons` on a hand-made Iconify collection (a fake @iconify/json tarball): every curation
rule, captions, de-duplication, blank renders, attribution and the output layout; offline, no npm."""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from clipforge.cli import data as data_cli
from clipforge.corpora import DatasetError, build_icons, icons
from clipforge.corpora.fetch import NpmPackage
from clipforge.corpora.icons import (
    Icon,
    brand_icon,
    category_caption,
    code_named_set,
    concept_key,
    deduplicate,
    emoji_set,
    exclude_concepts,
    excluded_category,
    hidden_set,
    icon_captions,
    keep_variants,
    lookalike_sibling,
    name_words,
    read_labels,
    restricted_licence,
    set_icons,
    split_style,
    style_caption,
)
from clipforge.corpora.svg import drawing_hash, ink_fraction, render_many
from test_datasets import _tar

SQUARE = '<path fill="currentColor" d="M4 4h16v16H4z"/>'
RING = '<circle cx="12" cy="12" r="8" fill="none" stroke="currentColor" stroke-width="3"/>'
BAR = '<path fill="currentColor" d="M2 10h20v4H2z"/>'
DOT = '<circle cx="12" cy="12" r="5" fill="currentColor"/>'


def _info(name: str, spdx: str = "MIT", category: str | None = "UI 24px", **extra) -> dict:
    info = {"name": name, "author": {"name": f"{name} authors", "url": f"https://example.org/{name}"},
            "license": {"title": spdx, "spdx": spdx, "url": f"https://example.org/{spdx}"}, **extra}
    if category:
        info["category"] = category
    return info


def _set(prefix: str, info: dict, body: str = SQUARE, **extra) -> dict:
    return {"prefix": prefix, "info": info, "icons": {"thing": {"body": body}}, "width": 24, "height": 24, **extra}


def fake_collection() -> dict[str, dict]:
    """Sets covering each rule; 'good' and 'other' are kept."""
    good = {
        "prefix": "good", "info": _info("Acme Icons"), "width": 24, "height": 24,
        "suffixes": {"": "Regular", "outline": "Outline"},
        "icons": {
            "home": {"body": SQUARE}, "home-outline": {"body": RING},  # two style variants of one stem
            "heart": {"body": DOT}, "format-bold": {"body": BAR},
            "btn-close-24": {"body": RING.replace('r="8"', 'r="6"')},  # abbreviation, size
            "cat": {"body": '<path fill="currentColor" d="M3 3h18v9H3z"/>'},
            "blank": {"body": '<path fill="currentColor" d="M0 0"/>'},  # draws nothing
            "old-thing": {"body": BAR, "hidden": True}, "brand-github": {"body": DOT.replace("5", "6")},
            "acme": {"body": DOT.replace("5", "7")},  # the set's own logo
            "spinner": {"body": '<circle cx="12" cy="12" r="9" fill="#000"><animate attributeName="r"/></circle>'},
            "24": {"body": BAR.replace("20v4", "20v6")},
        },
        "aliases": {"house": {"parent": "home"}, "home-flipped": {"parent": "home", "hFlip": True}},
        "categories": {"Animals": ["cat"], "General": ["home"], "InterfaceEssential": ["heart"]},
    }
    other = {
        "prefix": "other", "info": _info("Other Set", "CC-BY-4.0", "UI 16px / 32px"), "width": 24, "height": 24,
        "icons": {"circle": {"body": DOT},  # the same drawing as good:heart
                  "grinning-face": {"body": '<path fill="#fc0" d="M2 2h20v20H2z"/>'},
                  "apple": {"body": '<path fill="#c00" d="M6 6h12v14H6z"/>'}},
    }
    sets = [good, other,
            _set("cbi", _info("Custom Brands", "CC-BY-NC-SA-4.0")),
            _set("gala", _info("Gala", "GPL-3.0")),
            _set("ghost", _info("Ghost", hidden=True)),
            _set("nocat", _info("No Category", category=None)),
            _set("brands", _info("Brands", category="Logos")),
            _set("smileys", _info("Smileys", category="Emoji")),
            _set("twemoji", _info("Twitter Emoji", "CC-BY-4.0")),
            _set("material-symbols-light", _info("Material Symbols Light", "Apache-2.0")),
            _set("flag", _info("Flags", category="Flags / Maps"))]
    return {s["prefix"]: s for s in sets}


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    """The fake collection as the tarball `npm pack @iconify/json@VERSION` writes; checksum off for it."""
    monkeypatch.setattr(icons, "PACKAGE", NpmPackage(icons.PACKAGE.name, icons.PACKAGE.version))
    cache = tmp_path / "cache"
    cache.mkdir()
    files = {f"package/json/{p}.json": json.dumps(s).encode() for p, s in fake_collection().items()}
    files["package/collections.json"] = b"{}"  # outside json/: never read
    _tar(cache / icons.PACKAGE.tarball, files)
    return cache


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _icon(prefix: str, name: str, key: str, body: str = SQUARE, rank: tuple = (0, ""), **kw) -> Icon:
    svg = f'<svg width="24" height="24" viewBox="0 0 24 24">{body}</svg>'
    return Icon(prefix, name, key, kw.pop("style", ""), svg, rank=rank, **kw)


def test_set_rules_decide_from_the_info_block():
    sets = fake_collection()
    assert restricted_licence("cbi", sets["cbi"]["info"]) and restricted_licence("gala", sets["gala"]["info"])
    assert restricted_licence("x", _info("x", "GPL-2.0-or-later"))
    assert restricted_licence("x", _info("x", "CC-BY-NC-4.0"))
    assert restricted_licence("x", {"license": {}})  # unknown licence: not kept
    assert not any(restricted_licence("x", _info("x", s)) for s in ("MIT", "CC-BY-SA-4.0", "Apache-2.0", "OFL-1.1"))
    assert hidden_set("ghost", sets["ghost"]["info"]) and hidden_set("nocat", sets["nocat"]["info"])
    assert not hidden_set("good", sets["good"]["info"])
    assert excluded_category("brands", sets["brands"]["info"])
    assert excluded_category("x", _info("x", category="Programming"))
    assert not excluded_category("good", sets["good"]["info"])
    assert emoji_set("smileys", sets["smileys"]["info"]) and emoji_set("twemoji", sets["twemoji"]["info"])
    assert emoji_set("noto-v1", _info("n")) and emoji_set("fxemoji", _info("f")) and not emoji_set("good", _info("g"))
    assert lookalike_sibling("material-symbols-light", {}) and lookalike_sibling("fa6-solid", {})
    assert not lookalike_sibling("material-symbols", {}) and not lookalike_sibling("fa7-solid", {})
    assert not set(icons.LOOKALIKES.values()) & set(icons.LOOKALIKES)  # each points at a kept set
    assert code_named_set("flag", {}) and not code_named_set("maki", {})


def test_names_words_styles_and_categories():
    assert name_words("btn-close-24px-alt") == ["button", "close"] and name_words("img-sm-2") == ["image"]
    assert name_words("arrow2-mp3") == ["arrow", "mp3"]
    assert concept_key("Grinning face") == "grinning-face" and concept_key("24") == ""
    declared = {"": "Regular", "outline": "Outline", "24-filled": "24 Filled"}
    assert split_style("add-24-filled", (), declared, {}) == ("add", "24 Filled")
    assert split_style("add", (), declared, {}) == ("add", "Regular")
    assert split_style("round-home", (), {}, {"round": "Round", "baseline": "Baseline"}) == ("home", "Round")
    assert split_style("heart-fill", {"heart"}, {}, {}) == ("heart", "fill")  # a sibling without the suffix
    assert split_style("format-bold", {"format-bold"}, {}, {}) == ("format-bold", "")  # no "format": a concept
    assert split_style("list-outline", set(), {}, {}) == ("list", "outline")  # always a style word
    assert split_style("star-o", {"star"}, {}, {}) == ("star", "o") and style_caption("o") == "outline"
    assert style_caption("Outline Rounded") == "outline rounded" and style_caption("Regular") == ""
    assert style_caption("BoldDuotone") == "bold duotone" and style_caption("24 Filled") == "filled"
    assert category_caption("MoneyPaymentsFinance") == "money payments finance"
    assert category_caption("Food / Drink") == "food and drink"
    assert category_caption("General") == category_caption("InterfaceEssential") == ""
    assert category_caption("Brand Logos") == ""
    assert brand_icon(["brand", "github"], ["acme"], "ac") and brand_icon(["zed", "logo"], [], "ac")
    assert brand_icon(["acme"], ["acme"], "ac") and brand_icon(["ac", "fill"], ["acme"], "ac")  # the set's own name
    assert not brand_icon(["heart"], ["acme"], "ac")


def test_set_icons_counts_each_icon_rule():
    drops = Counter()
    found = {i.name: i for i in set_icons(fake_collection()["good"], drops)}
    assert drops == {"hidden_icon": 1, "brand": 2, "animated": 1, "no_words": 1}
    assert set(found) == {"home", "home-outline", "heart", "format-bold", "btn-close-24", "cat", "blank"}
    assert found["home-outline"].key == found["home"].key == "home" and found["home-outline"].style == "outline"
    assert found["btn-close-24"].key == "button-close" and found["format-bold"].key == "format-bold"
    assert found["home"].synonyms == found["home-outline"].synonyms == ["house"]  # not the flipped alias
    assert found["cat"].categories == ["animals"] and found["home"].categories == []  # "General" is stop-listed
    assert 'fill="#000"' in found["home"].svg and "currentColor" not in found["home"].svg


def test_keep_variants_prefers_24px_then_a_fixed_hash():
    group = [_icon("s", f"add-{n}", "add", rank=(abs(n - 24), f"{n}")) for n in (16, 24, 32)]
    kept, dropped = keep_variants(group + [_icon("t", "add", "add")], 1)
    assert dropped == 2 and [(i.prefix, i.name) for i in kept] == [("s", "add-24"), ("t", "add")]
    kept, dropped = keep_variants(group, 2)
    assert dropped == 1 and {i.name for i in kept} == {"add-24", "add-16"}


def test_deduplicate_keeps_the_first_drawing_and_merges_names():
    a, b = _icon("a", "home", "home"), _icon("b", "dwelling", "dwelling", synonyms=["abode"])
    c = _icon("c", "x", "x", DOT)
    assert drawing_hash(a.svg) == drawing_hash(a.svg.replace("><", ">\n  <"))  # whitespace does not count
    kept, dropped = deduplicate([a, b, c])
    assert dropped == 1 and kept == [a, c] and a.synonyms == ["dwelling", "abode"]


def test_exclude_concepts_matches_keys_and_synonyms():
    icons_ = [_icon("a", "grinning-face", "grinning-face"), _icon("a", "dog", "dog", synonyms=["red apple"]),
              _icon("a", "cat", "cat")]
    kept, removed = exclude_concepts(icons_, ["Grinning face", "red apple", "unicorn", "24"])
    assert [i.name for i in kept] == ["cat"]
    assert [(i.name, label) for i, label in removed] == [("grinning-face", "Grinning face"), ("dog", "red apple")]


def test_icon_captions_several_candidates_never_the_set_name():
    icon = _icon("good", "cat-outline", "cat", style="outline", categories=["animals", "pets", "third"],
                 synonyms=["kitty", "house|cat"])
    assert icon_captions(icon) == ["cat", "cat icon", "cat, outline icon", "cat, animals", "cat, pets", "kitty",
                                   "house/cat"]


def test_ink_fraction():
    assert ink_fraction(Image.new("RGB", (10, 10), "white")) == 0
    image = Image.new("RGB", (10, 10), "white")
    image.paste((0, 0, 0), (0, 0, 5, 10))
    assert ink_fraction(image) == 0.5


def test_render_pool_matches_inline(tmp_path):
    svg = f'<svg width="24" height="24" viewBox="0 0 24 24">{DOT.replace("currentColor", "#000")}</svg>'
    tiny = svg.replace('r="5"', 'r="0.1"')  # blank at 8 px
    jobs = [(svg if i % 3 else tiny, str(tmp_path / "p" / f"{i}.png"), 8) for i in range(300)]
    pooled = render_many(jobs, workers=2, progress=False)
    assert pooled == render_many(jobs[:30], workers=1, progress=False) * 10
    assert len(os.listdir(tmp_path / "p")) == 200  # blank renders are not saved


def test_build_layout_counts_attribution(tmp_path, fake_cache):
    manifest = build_icons(tmp_path / "root", size=32, cache=fake_cache, workers=1, progress=False)
    out = tmp_path / "root" / "icons"
    assert sorted(os.listdir(tmp_path / "root")) == ["icons"]  # no temporary folders left
    assert {rule: c["sets"] for rule, c in manifest["dropped_sets"].items()} == {
        "licence": 2, "hidden_set": 2, "emoji": 2, "category": 1, "lookalike": 1, "code_names": 1}
    assert manifest["dropped_sets"]["licence"]["prefixes"] == ["cbi", "gala"]
    assert manifest["dropped_icons"] == {"hidden_icon": 1, "brand": 2, "unrenderable": 0, "animated": 1, "no_words": 1,
                                         "variants": 1, "duplicate": 1, "excluded_label": 0, "limit": 0, "blank": 1}
    assert list(manifest["dropped_icons"]) == list(icons.ICON_RULES)
    assert (manifest["icons"], manifest["sets"], manifest["stems"]) == (7, 2, 7)
    assert manifest["icons_in_kept_sets"] == 15 and len(manifest["package"]["sha256"]) == 64
    rows = {r["image"]: r for r in _rows(out / "captions.csv")}
    assert {r["key"] for r in rows.values()} == {"home", "heart", "format-bold", "button-close", "cat",
                                                 "grinning-face", "apple"}
    assert "images/other/circle.png" not in rows and not (out / "images/good/blank.png").exists()
    for image, row in rows.items():
        picture = Image.open(out / image)
        assert picture.size == (32, 32) and picture.mode == "RGB" and picture.getpixel((0, 0)) == (255, 255, 255)
        assert ink_fraction(picture) > 0.005 and "acme" not in row["caption"] and "other" not in row["caption"]
        assert row["set"] == image.split("/")[1] and row["caption"].split("|")[0] == row["key"].replace("-", " ")
    assert "circle" in rows["images/good/heart.png"]["caption"].split("|")  # the duplicate's name: a synonym
    home = rows.get("images/good/home.png") or rows["images/good/home-outline.png"]
    assert "house" in home["caption"].split("|")
    assert rows["images/good/cat.png"]["caption"] == "cat|cat icon|cat, animals"
    assert Image.open(out / "images/good/heart.png").convert("L").getextrema()[0] == 0  # currentColor -> black
    attribution = (out / "ATTRIBUTION.md").read_text()
    assert "**Acme Icons** (`good`, 5 icons) by [Acme Icons authors](https://example.org/Acme Icons)" in attribution
    assert "**Other Set** (`other`, 2 icons)" in attribution and "`CC-BY-4.0`" in attribution
    assert "cbi" not in attribution and _rows(out / "excluded.csv") == []
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["icons_per_set"] == {"good": 5, "other": 2} and saved["options"]["variants"] == 1


def test_variants_exclusion_and_up_to_date(tmp_path, fake_cache):
    root = tmp_path / "root"
    build_icons(root, size=16, cache=fake_cache, workers=1, progress=False)
    stamp = (root / "icons" / "manifest.json").stat().st_mtime_ns
    assert build_icons(root, size=16, cache=fake_cache, progress=False)["up_to_date"]
    assert (root / "icons" / "manifest.json").stat().st_mtime_ns == stamp
    both = build_icons(root, size=16, variants=2, cache=fake_cache, workers=1, progress=False)
    assert not both["up_to_date"] and both["dropped_icons"]["variants"] == 0 and both["icons"] == 8
    labels = tmp_path / "labels.txt"
    labels.write_text("# unseen emoji concepts\ngrinning face\nHouse\n")
    removed = build_icons(root, size=16, exclude_labels=read_labels(labels), cache=fake_cache, workers=1,
                          progress=False)
    assert removed["dropped_icons"]["excluded_label"] == 2 and removed["icons"] == 5 and removed["excluded_labels"] == 2
    assert {(r["key"], r["label"]) for r in _rows(root / "icons" / "excluded.csv")} == {
        ("grinning-face", "grinning face"), ("home", "House")}
    assert not (root / "icons" / "images" / "other" / "grinning-face.png").exists()
    limited = build_icons(root, size=16, limit=3, cache=fake_cache, workers=2, progress=False)
    assert limited["icons"] + limited["dropped_icons"]["blank"] == 3 and limited["dropped_icons"]["limit"] == 5


def test_read_labels_from_csv(tmp_path):
    (tmp_path / "c.csv").write_text("hexcode,label\n1f600,grinning face\n")
    assert read_labels(tmp_path / "c.csv") == ["grinning face"]
    (tmp_path / "bad.csv").write_text("hexcode,name\n1f600,x\n")
    with pytest.raises(DatasetError, match="'label' column"):
        read_labels(tmp_path / "bad.csv")
    with pytest.raises(DatasetError, match="cannot read"):
        read_labels(tmp_path / "missing.txt")


def test_failure_midway_leaves_no_dataset(tmp_path, fake_cache, monkeypatch):
    def broken(jobs, workers, progress=True):
        raise OSError("disk on fire")

    monkeypatch.setattr(icons, "render_many", broken)
    with pytest.raises(OSError, match="disk on fire"):
        build_icons(tmp_path / "root", cache=fake_cache, progress=False)
    assert os.listdir(tmp_path / "root") == []


def test_corrupt_tarball_and_checksum_are_refused(tmp_path, fake_cache, monkeypatch):
    pinned = NpmPackage(icons.PACKAGE.name, icons.PACKAGE.version, "0" * 64)
    monkeypatch.setattr(icons, "PACKAGE", pinned)
    with pytest.raises(DatasetError, match="sha256"):
        build_icons(tmp_path / "root", cache=fake_cache, progress=False)
    monkeypatch.setattr(icons, "PACKAGE", NpmPackage(pinned.name, pinned.version))
    (fake_cache / pinned.tarball).write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(DatasetError, match=r"corrupt.*npm pack @iconify/json@"):
        build_icons(tmp_path / "root", cache=fake_cache, progress=False)
    assert not (tmp_path / "root" / "icons").exists()


def test_cli_summary_and_up_to_date(tmp_path, fake_cache, capsys):
    parser = argparse.ArgumentParser(prog="clipforge")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["data", "icons", "--root", str(tmp_path / "r"), "--cache", str(fake_cache), "--size", "16", "--quiet",
            "--workers", "1"]
    args = parser.parse_args(argv)
    args.func(args)
    out = capsys.readouterr().out
    assert "wrote 7 icons (2 sets, 7 stems)" in out and "licence 2 (2 icons)" in out and "duplicate 1" in out
    args = parser.parse_args(argv)
    args.func(args)
    assert "up to date" in capsys.readouterr().out

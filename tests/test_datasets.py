"""Dataset builders (`clipforge data emoji|tuxpaint`) on tiny fake npm tarballs and stamp folders; two real
fetches at --limit 20, skipped without npm / apt-get or with CLIPFORGE_OFFLINE=1."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipforge.cli import data as data_cli
from clipforge.corpora import DatasetError, build_emoji, build_tuxpaint, emoji, fetch, tuxpaint
from clipforge.corpora.fetch import NpmPackage, safe_extract

OFFLINE = os.environ.get("CLIPFORGE_OFFLINE") == "1"
REAL_CACHE = Path(os.environ.get("CLIPFORGE_DATA_CACHE", Path.home() / ".cache" / "clipforge" / "datasets"))


def _png(color: str, size: int = 64, margin: int = 8, mode: str = "RGBA") -> bytes:
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (size - 2 * margin, size - 2 * margin), color), (margin, margin))
    out = io.BytesIO()
    (image if mode == "RGBA" else image.convert(mode)).save(out, "PNG")
    return out.getvalue()


def _svg(color: str) -> bytes:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="30" '
            f'fill="{color}"/></svg>').encode()


def _tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


# (hexcode as the sources spell it, label, tags, group, subgroup, gender, colour); cat face lacks Twitter art.
CONCEPTS = [
    ("1F600", "grinning face", ["face", "grin", "143", "*", "twitter"], 0, 0, None, "#fc0"),
    ("2764-FE0F", "red heart", ["love", "heart"], 0, 1, None, "#e00"),
    ("1F3C3", "person running", ["marathon", "running"], 1, 2, None, "#36c"),
    ("1F3C3-200D-2642-FE0F", "man running", ["marathon", "man"], 1, 2, 1, "#35c"),
    ("1F3C3-200D-2640-FE0F", "woman running", ["marathon", "woman"], 1, 2, 0, "#34c"),
    ("1F436", "dog face", ["dog", "pet"], 3, 3, None, "#a60"),
    ("1F34E", "red apple", ["apple", "fruit"], 4, 4, None, "#c00"),
    ("1F697", "automobile", ["car"], 5, 5, None, "#09c"),
    ("1F431", "cat face", ["cat", "pet"], 3, 3, None, "#888"),
]


def make_fake_npm_cache(cache: Path) -> Path:
    """Tarballs shaped like the six pinned packages, named as `npm pack` names them."""
    cache.mkdir(parents=True, exist_ok=True)
    data, om, chars, icons = [], [], {}, {}
    for order, (hexcode, label, tags, group, subgroup, gender, _) in enumerate(CONCEPTS):
        entry = {"label": label, "hexcode": hexcode, "tags": tags, "group": group, "subgroup": subgroup, "order": order}
        if gender is not None:
            entry["gender"] = gender
        if hexcode == "1F3C3":
            entry["skins"] = [{"label": "person running: dark skin tone", "hexcode": "1F3C3-1F3FF"}]
        data.append(entry)
    data.append({"label": "regional indicator A", "hexcode": "1F1E6"})  # no group: never a concept
    messages = {"groups": [{"key": f"g{i}", "message": f"group {i}", "order": i} for i in range(6)],
                "subgroups": [{"key": f"s{i}", "message": f"subgroup {i}", "order": i} for i in range(6)]}
    files = {name: {} for name in ("google", "twitter", "openmoji", "flat", "3d")}
    for style in ("google", "twitter"):
        rows = []
        for hexcode, *_, color in CONCEPTS:
            if style == "twitter" and hexcode == "1F431":
                continue
            image = f"{hexcode.lower()}.png"
            rows.append({"unified": hexcode, "image": image, f"has_img_{style}": True})
            files[style][f"package/img/{style}/64/{image}"] = _png(color)
        files[style]["package/emoji.json"] = json.dumps(rows).encode()
    for hexcode, label, *_, color in CONCEPTS:
        om.append({"hexcode": hexcode, "annotation": label, "skintone": ""})
        files["openmoji"][f"package/color/svg/{hexcode}.svg"] = _svg(color)
        files["openmoji"][f"package/black/svg/{hexcode}.svg"] = _svg("#000")
        name = label.replace(" ", "-")
        chars[hexcode.lower().replace("-fe0f", "")] = name
        icons[name] = {"body": f'<rect x="4" y="6" width="24" height="20" fill="{color}"/>'}
    om.append({"hexcode": "1F3C3-1F3FF", "annotation": "skin tone", "skintone": 5})
    icons["dog-face-left"] = icons.pop("dog-face")  # Iconify alias with a flip, as in the real set
    aliases = {"dog-face": {"parent": "dog-face-left", "hFlip": True}}
    files["openmoji"]["package/data/openmoji.json"] = json.dumps(om).encode()
    for key in ("flat", "3d"):
        icon_set = {"prefix": key, "icons": icons, "aliases": aliases, "width": 32, "height": 32}
        files[key]["package/icons.json"] = json.dumps(icon_set).encode()
        files[key]["package/chars.json"] = json.dumps(chars if key == "flat" else {}).encode()
    base = {"emojibase": {"package/en/data.json": json.dumps(data).encode(),
                          "package/en/messages.json": json.dumps(messages).encode()}}
    keys = {"google": "google", "twitter": "twitter", "openmoji": "openmoji", "fluent-flat": "flat", "fluent-3d": "3d"}
    for key, package in emoji.PACKAGES.items():
        _tar(cache / package.tarball, base["emojibase"] if key == "emojibase" else files[keys[key]])
    return cache


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    """Fake tarballs in tmp_path/cache; the pinned checksums are switched off for them."""
    monkeypatch.setattr(emoji, "PACKAGES", {k: NpmPackage(p.name, p.version) for k, p in emoji.PACKAGES.items()})
    return make_fake_npm_cache(tmp_path / "cache")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_emoji_layout_tables_and_manifest(tmp_path, fake_cache):
    manifest = build_emoji(tmp_path / "root", cache=fake_cache, progress=False)
    out = tmp_path / "root" / "emoji"
    assert not manifest["up_to_date"] and manifest["concepts"] == 8 and manifest["images"] == 48
    assert sorted(os.listdir(tmp_path / "root")) == ["emoji"]  # no temporary folders left
    concepts = {r["hexcode"]: r for r in _rows(out / "concepts.csv")}
    assert "1f431" not in concepts and "2764" in concepts  # not in all styles; fe0f dropped
    assert concepts["1f600"]["tags"] == "face|grin"  # numbers, symbols and style words dropped
    assert concepts["1f600"]["group"] == "group 0" and concepts["1f600"]["subgroup"] == "subgroup 0"
    man = concepts["1f3c3-200d-2642"]
    assert (man["gender"], man["base_concept"]) == ("man", "person running")
    assert (concepts["1f3c3"]["gender"], concepts["1f436"]["gender"]) == ("person", "")
    assert len({concepts[k]["split"] for k in ("1f3c3", "1f3c3-200d-2642", "1f3c3-200d-2640")}) == 1  # one family
    for style in emoji.STYLES:
        for key in concepts:
            image = Image.open(out / "images" / style / f"{key}.png")
            assert image.size == (64, 64) and image.mode == "RGB"
            assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white
    captions = _rows(out / "captions.csv")
    assert len(captions) == 48 and set(captions[0]) == {"image", "caption", "key", "style", "split"}
    for row in captions:
        assert (out / row["image"]).is_file() and row["split"] == concepts[row["key"]]["split"]
        candidates = row["caption"].split("|")
        assert candidates[0] == concepts[row["key"]]["label"] and len(candidates) >= 2
        assert not any(w in row["caption"].lower() for w in ("google", "twitter", "openmoji", "fluent"))
    labels = _rows(out / "labels.csv")
    expected = {(c["label"], str(i)) for i, c in enumerate(concepts.values())}
    assert {(r["label"], r["class_index"]) for r in labels} == expected
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["images_per_style"] == {s: 8 for s in emoji.STYLES} and saved["split_seed"] == 0
    assert all(len(p["sha256"]) == 64 for p in saved["packages"].values())
    assert saved["packages"]["openmoji"]["version"] == "17.0.0" and saved["image_size"] == 64


def test_emoji_split_is_stored_and_deterministic(tmp_path, fake_cache):
    splits = []
    for name in ("a", "b"):
        build_emoji(tmp_path / name, cache=fake_cache, styles=["openmoji-black"], size=16, progress=False)
        splits.append([(r["hexcode"], r["split"]) for r in _rows(tmp_path / name / "emoji" / "concepts.csv")])
    assert splits[0] == splits[1]
    assert {s for _, s in splits[0]} == {"seen", "unseen"}
    limited = build_emoji(tmp_path / "c", cache=fake_cache, styles=["openmoji-black"], size=16, limit=3, progress=False)
    assert limited["concepts"] == 3
    assert [(r["hexcode"], r["split"]) for r in _rows(tmp_path / "c" / "emoji" / "concepts.csv")] == splits[0][:3]


def test_emoji_rerun_does_nothing_and_new_options_rebuild(tmp_path, fake_cache):
    root = tmp_path / "root"
    build_emoji(root, cache=fake_cache, styles=["google,fluent-3d"], progress=False)
    stamp = (root / "emoji" / "manifest.json").stat().st_mtime_ns
    again = build_emoji(root, cache=fake_cache, styles=["fluent-3d", "google"], progress=False)
    assert again["up_to_date"] and (root / "emoji" / "manifest.json").stat().st_mtime_ns == stamp
    bigger = build_emoji(root, cache=fake_cache, styles=["google", "fluent-3d"], size=32, progress=False)
    assert not bigger["up_to_date"] and Image.open(root / "emoji" / "images" / "google" / "1f600.png").size == (32, 32)
    assert sorted(os.listdir(root / "emoji" / "images")) == ["fluent-3d", "google"]


def test_emoji_failure_midway_leaves_no_dataset(tmp_path, fake_cache, monkeypatch):
    calls = []
    real = emoji.render_emoji

    def flaky(source, size):
        calls.append(source)
        if len(calls) == 10:
            raise OSError("disk on fire")
        return real(source, size)

    monkeypatch.setattr(emoji, "render_emoji", flaky)
    with pytest.raises(DatasetError, match="disk on fire"):
        build_emoji(tmp_path / "root", cache=fake_cache, progress=False)
    assert not (tmp_path / "root" / "emoji").exists() and not (tmp_path / "root" / ".emoji.tmp").exists()
    assert [p.name for p in (tmp_path / "root").iterdir()] == []
    # A failed rebuild keeps the previous complete dataset.
    monkeypatch.setattr(emoji, "render_emoji", real)
    build_emoji(tmp_path / "root", cache=fake_cache, styles=["google"], progress=False)
    calls.clear()
    monkeypatch.setattr(emoji, "render_emoji", flaky)
    with pytest.raises(DatasetError):
        build_emoji(tmp_path / "root", cache=fake_cache, size=32, progress=False)
    assert json.loads((tmp_path / "root" / "emoji" / "manifest.json").read_text())["image_size"] == 64


def test_corrupt_archive_gives_clear_error(tmp_path, fake_cache):
    (fake_cache / emoji.PACKAGES["openmoji"].tarball).write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match=r"corrupt.*npm pack openmoji@17\.0\.0"):
        build_emoji(tmp_path / "root", cache=fake_cache, progress=False)
    assert not (tmp_path / "root" / "emoji").exists()


def test_checksum_mismatch_is_refused(tmp_path):
    cache = make_fake_npm_cache(tmp_path / "cache")  # real pinned checksums stay on
    with pytest.raises(DatasetError, match="sha256"):
        build_emoji(tmp_path / "root", cache=cache, progress=False)


def test_unsafe_archive_member_is_refused(tmp_path):
    _tar(tmp_path / "evil.tgz", {"package/ok.txt": b"ok", "package/../../evil.txt": b"x"})
    with pytest.raises(DatasetError, match="unsafe"):
        safe_extract(tmp_path / "evil.tgz", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_missing_npm_names_the_manual_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(DatasetError, match=r"`npm` is not on PATH.*npm pack emoji-datasource-google@16\.0\.0.*--cache"):
        build_emoji(tmp_path / "root", cache=tmp_path / "empty", progress=False)
    assert not (tmp_path / "root" / "emoji").exists()


def test_iconify_alias_flip():
    icon_set = {"icons": {"a": {"body": "<path/>", "width": 20}}, "aliases": {"b": {"parent": "a", "hFlip": True}},
                "height": 32}
    svg = emoji.iconify_svg(icon_set, "b")
    assert 'viewBox="0 0 20 32"' in svg and "translate(20 0) scale(-1 1)" in svg
    assert emoji.iconify_svg(icon_set, "missing") is None


def test_eval_style_index_matches_chars_then_label_slug(tmp_path):
    concepts = {k: emoji.Concept(k, label, [], "", "", i) for i, (k, label) in enumerate(
        [("1f600", "grinning face"), ("2764", "red heart"), ("1f170", "A button (blood type)"),
         ("1f45e", "man’s shoe"), ("1fa85", "piñata"), ("1f431", "cat face")])}
    icons = {n: {"body": "<path/>"} for n in ("grinning-face", "heart-red", "a-button", "pinata", "cat")}
    (tmp_path / "icons.json").write_text(json.dumps({"icons": icons, "aliases": {"mans-shoe": {"parent": "cat"}}}))
    (tmp_path / "chars.json").write_text(json.dumps({"2764-fe0f": "heart-red"}))
    index = emoji.eval_style_index(tmp_path / "icons.json", tmp_path / "chars.json", concepts)
    assert set(index) == {"1f600", "2764", "1f170", "1f45e", "1fa85"}  # "cat face" has no icon of that name
    assert emoji.label_slug("man’s shoe") == "mans-shoe"
    assert emoji.label_slug("flag: Côte d’Ivoire") == "flag-cote-divoire"
    without_chars = emoji.eval_style_index(tmp_path / "icons.json", tmp_path / "none.json", concepts)
    assert without_chars.keys() == index.keys() - {"2764"}


def test_eval_styles_are_opt_in_and_keep_the_concepts(tmp_path, fake_cache, monkeypatch):
    unpinned = {k: NpmPackage(p.name, p.version) for k, p in emoji.EVAL_PACKAGES.items()}
    monkeypatch.setattr(emoji, "EVAL_PACKAGES", unpinned)
    icons = {label.replace(" ", "-"): {"body": '<circle cx="16" cy="16" r="12"/>'} for _, label, *_ in CONCEPTS[:4]}
    _tar(fake_cache / emoji.EVAL_PACKAGES["noto-v1"].tarball,
         {"package/icons.json": json.dumps({"prefix": "noto-v1", "icons": icons, "width": 32, "height": 32}).encode(),
          "package/chars.json": b"{}"})
    default = build_emoji(tmp_path / "a", cache=fake_cache, styles=["google"], progress=False)
    manifest = build_emoji(tmp_path / "b", cache=fake_cache, styles=["noto-v1", "google"], progress=False)
    assert "@iconify-json/noto-v1" not in default["options"]["packages"] and "eval_styles" not in default
    assert manifest["styles"] == ["google", "noto-v1"] and manifest["eval_styles"] == ["noto-v1"]
    assert manifest["concepts"] == default["concepts"] == 8
    assert manifest["images_per_style"] == {"google": 8, "noto-v1": 4}  # only the concepts noto-v1 draws
    rows = _rows(tmp_path / "b" / "emoji" / "captions.csv")
    assert sorted(r["key"] for r in rows if r["style"] == "noto-v1") == ["1f3c3", "1f3c3-200d-2642", "1f600", "2764"]
    assert _rows(tmp_path / "a" / "emoji" / "concepts.csv") == _rows(tmp_path / "b" / "emoji" / "concepts.csv")
    assert len(_rows(tmp_path / "b" / "emoji" / "labels.csv")) == 12
    assert "noto-v1" not in emoji.STYLES and set(emoji.EVAL_STYLES) == set(emoji.EVAL_PACKAGES)


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="clipforge")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_builds_then_says_up_to_date(tmp_path, fake_cache, capsys):
    argv = ["data", "emoji", "--root", str(tmp_path / "r"), "--cache", str(fake_cache), "--styles", "twitter",
            "--size", "24", "--limit", "5", "--quiet"]
    _cli(argv)
    assert "wrote 5 images" in capsys.readouterr().out
    _cli(argv)
    assert "up to date" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown emoji style"):
        _cli(argv + ["--styles", "apple"])


def make_fake_stamps(folder: Path) -> Path:
    """A stamps folder: PNG + SVG twins, a mirror, a stamp without text, a stem clash, P and LA images."""
    files = {
        "animals/mammals/cat.png": _png("#f80", 120, 30), "animals/mammals/cat.txt": "A cat.\nfr.utf8=Un chat.\n",
        "animals/mammals/cat_mirror.png": _png("#f80"),
        "animals/birds/owl.png": _png("#642", 50, 5, mode="P"), "animals/birds/owl.txt": "An owl.",
        "food/apple.png": _png("#0f0"), "food/apple.svg": _svg("#c00"), "food/apple.txt": "\ufeffA red apple.",
        "food/pear.png": _png("#dd0", mode="LA"), "food/pear.txt": "A pear.",
        "food/cartoon/pear.png": _png("#ee0"), "food/cartoon/pear.txt": "A cartoon pear.",
        "food/notext.png": _png("#000"),
    }
    for name, payload in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload.encode() if isinstance(payload, str) else payload)
    return folder


def test_tuxpaint_from_stamps_folder(tmp_path):
    stamps = make_fake_stamps(tmp_path / "stamps")
    manifest = build_tuxpaint(tmp_path / "root", stamps=stamps, size=32, progress=False)
    out = tmp_path / "root" / "tuxpaint"
    assert manifest["stamps"] == 5 and manifest["categories"] == 2 and manifest["source"]["kind"] == "folder"
    assert manifest["skipped_files"] == {"mirror": 1, "png_with_svg": 1, "no_text": 1, "unreadable": 0}
    captions = {r["image"]: r for r in _rows(out / "captions.csv")}
    assert set(captions) == {"images/animals/cat.png", "images/animals/owl.png", "images/food/apple.png",
                             "images/food/pear.png", "images/food/cartoon-pear.png"}
    assert captions["images/animals/cat.png"]["caption"] == "A cat."
    assert captions["images/food/apple.png"]["caption"] == "A red apple."  # BOM and translations dropped
    assert captions["images/food/cartoon-pear.png"]["key"] == "cartoon-pear"
    labels = {r["image"]: (r["label"], r["class_index"]) for r in _rows(out / "labels.csv")}
    assert labels["images/animals/owl.png"] == ("animals", "0") and labels["images/food/pear.png"] == ("food", "1")
    cat = Image.open(out / "images" / "animals" / "cat.png")
    assert cat.size == (32, 32) and cat.mode == "RGB" and cat.getpixel((1, 1))[2] < 100  # cropped to content
    apple = Image.open(out / "images" / "food" / "apple.png")  # the SVG twin wins: red, not green
    assert apple.getpixel((16, 16))[0] > 150 and apple.getpixel((16, 16))[1] < 80
    assert apple.getpixel((0, 0)) == (255, 255, 255)
    again = build_tuxpaint(tmp_path / "root", stamps=stamps, size=32, progress=False)
    assert again["up_to_date"]
    assert build_tuxpaint(tmp_path / "root", stamps=stamps, size=32, limit=2, progress=False)["stamps"] == 2


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not on PATH")
@pytest.mark.integration
def fake_stamps_deb(tmp_path: Path, fill=make_fake_stamps) -> Path:
    """A cache folder with a tuxpaint-stamps-default 1.0-1 .deb whose stamps folder `fill(folder)` writes; the
    .deb's path."""
    package = tmp_path / "pkg"
    fill(package / "usr" / "share" / "tuxpaint" / "stamps")
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN" / "control").write_text("Package: tuxpaint-stamps-default\nVersion: 1.0-1\nArchitecture: all\n"
                                                "Maintainer: test <t@example.org>\nDescription: test stamps\n")
    (tmp_path / "cache").mkdir()
    deb = tmp_path / "cache" / "tuxpaint-stamps-default_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(package), str(deb)], check=True,
                   capture_output=True)
    return deb


def test_tuxpaint_from_cached_deb(tmp_path, monkeypatch):
    monkeypatch.setattr(tuxpaint, "INSTALLED", tmp_path / "not-installed")
    deb = fake_stamps_deb(tmp_path)
    cache = deb.parent
    manifest = build_tuxpaint(tmp_path / "root", cache=cache, progress=False)
    assert manifest["source"]["version"] == "1.0-1" and len(manifest["source"]["sha256"]) == 64
    assert manifest["stamps"] == 5
    monkeypatch.setattr(fetch, "extract_deb", lambda *a, **k: pytest.fail("the unpacked .deb is cached"))
    assert build_tuxpaint(tmp_path / "root", cache=cache, size=16, progress=False)["stamps"] == 5
    deb.write_bytes(b"!<arch>\nbroken")
    with pytest.raises(DatasetError, match="delete it|Delete"):
        build_tuxpaint(tmp_path / "root2", cache=cache, progress=False)
    assert not (tmp_path / "root2" / "tuxpaint").exists()


def test_tuxpaint_reads_installed_stamps(tmp_path, monkeypatch):
    monkeypatch.setattr(tuxpaint, "INSTALLED", make_fake_stamps(tmp_path / "installed"))
    manifest = build_tuxpaint(tmp_path / "root", cache=tmp_path / "cache", progress=False)
    assert manifest["source"]["kind"] == "installed" and manifest["stamps"] == 5


def test_tuxpaint_missing_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(tuxpaint, "INSTALLED", tmp_path / "not-installed")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(DatasetError, match=r"`apt-get` is not on PATH.*apt-get download tuxpaint-stamps-default"):
        build_tuxpaint(tmp_path / "root", cache=tmp_path / "cache", progress=False)
    assert not (tmp_path / "root" / "tuxpaint").exists()


@pytest.mark.skipif(OFFLINE or shutil.which("npm") is None,
                    reason="needs npm and the npm registry (CLIPFORGE_OFFLINE=1 skips)")
@pytest.mark.integration
def test_real_emoji_limit_20(tmp_path):
    manifest = build_emoji(tmp_path / "root", limit=20, cache=REAL_CACHE, progress=False)
    assert manifest["concepts_in_all_styles"] == 1594 and manifest["concepts"] == 20
    assert manifest["images"] == 120 and manifest["seen"] + manifest["unseen"] == 20 and manifest["unseen"] > 0
    assert len(_rows(tmp_path / "root" / "emoji" / "captions.csv")) == 120
    assert Image.open(tmp_path / "root" / "emoji" / "images" / "fluent-3d" / "1f600.png").size == (64, 64)


@pytest.mark.skipif(OFFLINE or shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                    reason="needs apt-get, dpkg-deb and the Debian archive (CLIPFORGE_OFFLINE=1 skips)")
@pytest.mark.integration
def test_real_tuxpaint_limit_20(tmp_path):
    manifest = build_tuxpaint(tmp_path / "root", limit=20, cache=REAL_CACHE, progress=False)
    assert manifest["stamps"] == 20 and manifest["source"]["kind"] in ("deb", "installed")
    rows = _rows(tmp_path / "root" / "tuxpaint" / "captions.csv")
    assert len(rows) == 20 and all(r["caption"] and r["category"] == "animals" for r in rows)

"""`clipforge data emoji --languages`: each concept's CLDR name and keywords per language, from fake CLDR tarballs
shaped like the pinned packages (variation selectors, ZWJ sequences in the derived set, a concept left unnamed) and,
with npm, from the real packages for Korean."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from clipforge.cli.main import main
from clipforge.corpora import build_emoji, cldr, emoji
from clipforge.corpora.fetch import NpmPackage
from clipforge.errors import DataError
from test_datasets import OFFLINE, REAL_CACHE, _tar, fake_cache  # noqa: F401  (the fixture)

KOREAN = {  # the full set files hearts with U+FE0F; the derived set holds the ZWJ sequences
    "full": {"😀": {"default": ["웃는 얼굴", "얼굴", "웃음"], "tts": ["활짝 웃는 얼굴"]},
             "❤️": {"default": ["사랑", "하트"], "tts": ["빨간색 하트"]},
             "🏃": {"default": ["달리기", "마라톤"], "tts": ["달리는 사람"]},
             "🐶": {"default": ["개", "애완동물"], "tts": ["강아지 얼굴"]},
             "🍎": {"default": ["과일", "사과"], "tts": ["빨간 사과"]},
             "🐱": {"default": ["고양이"], "tts": ["고양이 얼굴"]}},
    "derived": {"🏃‍♂️": {"default": ["남자", "달리기"], "tts": ["달리는 남자"]},
                "🏃‍♀️": {"default": ["여자", "달리기"], "tts": ["달리는 여자"]},
                "🐶": {"default": ["덮어쓰면 안 됨"], "tts": ["틀린 이름"]}},  # the full set wins
}


@pytest.fixture
def cldr_cache(fake_cache, monkeypatch):  # noqa: F811
    packages = tuple(NpmPackage(p.name, p.version) for p in cldr.CLDR_PACKAGES)
    monkeypatch.setattr(emoji, "CLDR_PACKAGES", packages)
    for package, folder, part in zip(packages, ("annotations", "annotationsDerived"), ("full", "derived")):
        body = {folder: {"identity": {"language": "ko"}, "annotations": KOREAN[part]}}
        _tar(fake_cache / package.tarball, {f"package/{folder}/ko/annotations.json": json.dumps(body).encode()})
    return fake_cache


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_language_tables_name_each_concept_and_keep_its_images_and_keys(tmp_path, cldr_cache, capsys):
    assert main(["data", "emoji", "--root", str(tmp_path), "--cache", str(cldr_cache), "--languages", "ko",
                 "--quiet"]) == 0
    assert "ko names 7 of 8 concepts" in capsys.readouterr().out  # the cat lacks Twitter art: not a concept
    out = tmp_path / "emoji"
    names = {r["hexcode"]: r for r in _rows(out / "concepts-ko.csv")}
    assert names["2764"]["name"] == "빨간색 하트" and names["1f3c3-200d-2642"]["name"] == "달리는 남자"
    assert names["1f436"]["name"] == "강아지 얼굴" and names["1f436"]["keywords"] == "개|애완동물"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["languages"]["ko"] == {"concepts": 7, "missing": ["1f697"]}  # CLDR has no automobile here
    english = {(r["image"], r["key"]) for r in _rows(out / "captions.csv") if r["key"] != "1f697"}
    korean = _rows(out / "captions-ko.csv")
    assert {(r["image"], r["key"]) for r in korean} == english  # the same images, keys, styles and splits
    heart = next(r for r in korean if r["key"] == "2764")["caption"].split("|")
    assert heart[0] == "빨간색 하트" and all(c.startswith("빨간색 하트") for c in heart)


def test_a_build_without_languages_keeps_its_options_and_unknown_languages_are_refused(tmp_path, cldr_cache):
    plain = build_emoji(tmp_path / "a", cache=cldr_cache, styles=["google"], progress=False)
    assert "languages" not in plain["options"] and "cldr-annotations-full" not in plain["packages"]
    assert not (tmp_path / "a" / "emoji" / "captions-ko.csv").exists()
    again = build_emoji(tmp_path / "a", cache=cldr_cache, styles=["google"], progress=False, languages=["ko"])
    assert not again["up_to_date"] and (tmp_path / "a" / "emoji" / "captions-ko.csv").exists()
    with pytest.raises(DataError, match="no emoji names in 'ja'"):
        build_emoji(tmp_path / "b", cache=cldr_cache, styles=["google"], progress=False, languages=["ja"])
    with pytest.raises(DataError, match="not CLDR language codes"):
        cldr.parse_languages(["ko,../etc"])
    assert cldr.parse_languages(["ko, ja", "ko", "zh-Hant"]) == ["ko", "ja", "zh-Hant"]


def test_caption_candidates_are_seeded_and_start_with_the_name():
    first = cldr.caption_candidates("1f431", "고양이 얼굴", ["고양이", "동물", "키티"], seed=0)
    assert first == cldr.caption_candidates("1f431", "고양이 얼굴", ["고양이", "동물", "키티"], seed=0)
    assert first[0] == "고양이 얼굴" and len(first) > 1 and all("|" not in c for c in first)
    assert cldr.caption_candidates("1f431", "이름", [], seed=0) == ["이름"]


@pytest.mark.skipif(OFFLINE or shutil.which("npm") is None,
                    reason="needs npm and the npm registry (CLIPFORGE_OFFLINE=1 skips)")
@pytest.mark.integration
def test_real_korean_names_every_concept_of_the_first_twenty(tmp_path):
    manifest = build_emoji(tmp_path / "root", limit=20, styles=["google"], cache=REAL_CACHE, progress=False,
                           languages=["ko"])
    assert manifest["languages"]["ko"] == {"concepts": 20, "missing": []}
    names = {r["hexcode"]: r["name"] for r in _rows(tmp_path / "root" / "emoji" / "concepts-ko.csv")}
    assert names["1f600"] == "활짝 웃는 얼굴"

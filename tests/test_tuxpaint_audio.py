"""`clipforge data tuxpaint --audio`: each stamp's recordings (effects, spoken names, descriptions per language)
paired with its picture, with transcripts and a split by stamp; a sound of another stamp never attaches, and the
recordings decode through clipforge's audio policy."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile

from clipforge.cli.main import main
from clipforge.corpora import tuxpaint
from clipforge.corpora.tuxpaint_audio import stamp_split
from clipforge.data.audio import decode_audio
from test_datasets import fake_stamps_deb, make_fake_stamps


def _ogg(path, seconds=0.3):
    path.parent.mkdir(parents=True, exist_ok=True)
    tone = 0.2 * np.sin(np.arange(int(seconds * 22050)) * 0.05).astype(np.float32)
    soundfile.write(path, tone, 22050, format="OGG")


def _stamps_with_sounds(folder):
    """make_fake_stamps plus recordings: cat's call, its French description, English one; a stamp cat_white with a
    sound of its own beside it; cat_big.ogg (no stamp, and "big" is no language of cat's text); a digit with its
    name in German."""
    make_fake_stamps(folder)
    mammals = folder / "animals" / "mammals"
    (mammals / "cat_white.png").write_bytes((mammals / "cat.png").read_bytes())
    (mammals / "cat_white.txt").write_text("A white cat.\n")
    for name in ("cat", "cat_desc", "cat_desc_fr", "cat_white", "cat_mirror_desc_xx_bad", "cat_big"):
        _ogg(mammals / f"{name}.ogg")
    (folder / "symbols").mkdir()
    (folder / "symbols" / "0.png").write_bytes((mammals / "cat.png").read_bytes())
    (folder / "symbols" / "0.txt").write_text("Zero.\nde.utf8=Null.\nfr.utf8=Zéro.\n")
    _ogg(folder / "symbols" / "0_de.ogg")
    return folder


def test_tuxpaint_audio_pairs_each_recording_with_its_stamp(tmp_path, capsys):
    stamps = _stamps_with_sounds(tmp_path / "stamps")
    assert main(["data", "tuxpaint", "--root", str(tmp_path / "root"), "--stamps", str(stamps), "--size", "16",
                 "--audio", "--quiet"]) == 0
    assert "5 recordings of 3 stamps (audio.csv)" in capsys.readouterr().out
    out = tmp_path / "root" / "tuxpaint"
    rows = list(csv.DictReader(open(out / "audio.csv", encoding="utf-8")))
    found = {(r["key"], r["kind"], r["language"], r["transcript"]) for r in rows}
    assert found == {("cat", "effect", "", ""), ("cat", "description", "en", "A cat."),
                     ("cat", "description", "fr", "Un chat."), ("cat_white", "effect", "", ""),
                     ("0", "name", "de", "Null.")}
    images = {r["image"] for r in csv.DictReader(open(out / "captions.csv", encoding="utf-8"))}
    for row in rows:
        assert row["image"] in images and row["split"] == stamp_split(row["key"])
        assert len(decode_audio(out / row["audio"], 16000)) == pytest.approx(0.3 * 16000, abs=2)
    assert [r["audio"] for r in rows if r["key"] == "cat_white"] == ["audio/animals/cat_white.ogg"]
    assert {stamp_split(f"stamp-{i}") for i in range(50)} == {"train", "test"}
    plain = tmp_path / "plain"
    assert main(["data", "tuxpaint", "--root", str(plain), "--stamps", str(stamps), "--quiet"]) == 0
    assert not (plain / "tuxpaint" / "audio.csv").exists() and not (plain / "tuxpaint" / "audio").exists()


def test_tuxpaint_audio_unpacks_the_recordings_from_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(tuxpaint, "INSTALLED", tmp_path / "not-installed")
    cache = fake_stamps_deb(tmp_path, _stamps_with_sounds).parent
    without = tuxpaint.build_tuxpaint(tmp_path / "root", cache=cache, progress=False)
    assert "audio" not in without
    manifest = tuxpaint.build_tuxpaint(tmp_path / "root", cache=cache, progress=False, audio=True)
    assert manifest["audio"]["recordings"] == 5 and not manifest["up_to_date"]
    assert manifest["audio"]["by_kind"] == {"description:en": 1, "description:fr": 1, "effect": 2, "name:de": 1}

"""The supervised reference of a binding (`train_against_targets`) and the demo's binding pairs: stamps joined to
emoji concepts by name, held-out recordings and concepts drawn stably, the pairs files as `clipforge bind` reads
them."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from torch import nn

from clipforge.demo.binding_data import audio_pairs, korean_pairs, stamp_concepts
from clipforge.errors import DataError, EvaluationError
from clipforge.evaluate.supervised import train_against_targets

CONCEPTS = [{"hexcode": "1f404", "label": "cow"}, {"hexcode": "1f34e", "label": "red apple"},
            {"hexcode": "1f436", "label": "dog face"}, {"hexcode": "1f47b", "label": "ghost"}]


def test_train_against_targets_learns_to_find_each_inputs_target():
    torch.manual_seed(0)
    targets = torch.nn.functional.normalize(torch.randn(12, 16), dim=-1)
    owners = torch.arange(12).repeat_interleave(5)
    inputs = targets[owners] @ torch.randn(16, 16) + 0.05 * torch.randn(60, 16)  # a linear map hides the target
    tower = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def accuracy() -> float:
        with torch.no_grad():
            return ((tower(inputs) @ targets.t()).argmax(-1) == owners).double().mean().item()

    before, seen = accuracy(), []
    hook = tower.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    trained = train_against_targets(tower, inputs, owners, targets, steps=150, batch_size=8, lr=1e-2)
    hook.remove()
    assert trained is tower and not tower.training and set(seen) == {8}
    assert accuracy() > max(0.9, before + 0.5)
    with pytest.raises(EvaluationError, match="nothing to train"):
        train_against_targets(tower, inputs, owners[:3], targets, steps=1, batch_size=4)


def _tuxpaint(folder):
    folder.mkdir(parents=True)
    with open(folder / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "key", "category"])
        writer.writerows([["images/a/cow.png", "A cow.", "cow", "a"], ["images/a/cow_white.png", "A white cow.",
                          "cow_white", "a"], ["images/a/apple2.png", "A red apple!", "apple2", "a"],
                          ["images/a/dog.png", "A dog.", "dog", "a"], ["images/a/zebra.png", "A zebra.", "zebra", "a"]])
    with open(folder / "audio.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "audio", "key", "label", "category", "kind", "language", "transcript", "split"])
        for key in ("cow", "cow_white", "apple2", "zebra"):
            for language in ("fr", "ru", "es", "ro"):
                writer.writerow([f"images/a/{key}.png", f"audio/a/{key}_desc_{language}.ogg", key, key, "a",
                                 "description", language, "", "train"])
                (folder / "audio" / "a").mkdir(parents=True, exist_ok=True)
                soundfile.write(folder / "audio" / "a" / f"{key}_desc_{language}.ogg",
                                np.sin(np.arange(4410) * 0.1).astype(np.float32) * 0.3, 22050, format="OGG")
    (folder / "audio" / "a" / "apple2_desc_ro.ogg").write_bytes(b"broken")  # left out, not fatal
    return folder


def test_stamps_join_emoji_concepts_by_name_and_recordings_are_held_out_stably(tmp_path, monkeypatch):
    tuxpaint = _tuxpaint(tmp_path / "tuxpaint")
    assert stamp_concepts(tuxpaint, CONCEPTS) == {"cow": "1f404", "apple2": "1f34e"}  # "dog" is not "dog face"
    emoji = tmp_path / "emoji"
    for style in ("google", "twitter"):
        for concept in CONCEPTS:
            (emoji / "images" / style).mkdir(parents=True, exist_ok=True)
            (emoji / "images" / style / f"{concept['hexcode']}.png").write_bytes(b"png")
    pairs = audio_pairs(tuxpaint, emoji, CONCEPTS, ["google", "twitter"], tmp_path / "out")
    assert pairs.concepts == 2 and len(pairs.test.audio) + len(pairs.train.audio) == 7  # one unreadable
    assert set(pairs.test.labels) == {"cow", "red apple"} and not set(pairs.test.audio) & set(pairs.train.audio)
    rows = list(csv.DictReader(open(pairs.train_csv)))
    assert len(rows) == 2 * len(pairs.train.audio) and {r["key"] for r in rows} == {"1f404", "1f34e"}
    for path in pairs.test.audio + [r["audio"] for r in rows]:  # resampled once: 16 kHz mono WAV
        info = soundfile.info(path)
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "WAV") and info.frames == 3200
    monkeypatch.chdir(tmp_path)  # relative folders: the pairs file still names files that exist
    again = audio_pairs(Path("tuxpaint"), Path("emoji"), CONCEPTS, ["google", "twitter"], Path("again"))
    cells = list(csv.DictReader(open(again.train_csv)))
    assert all(Path(r["audio"]).is_absolute() and Path(r["image"]).is_file() for r in cells)
    assert [Path(a).name for a in again.test.audio] == [Path(a).name for a in pairs.test.audio]
    with pytest.raises(DataError, match="no recording of an emoji concept"):
        audio_pairs(tuxpaint, emoji, CONCEPTS[2:], ["google"], tmp_path / "none")


def test_korean_pairs_hold_out_concepts_and_keep_test_images_out(tmp_path):
    emoji = tmp_path / "emoji"
    emoji.mkdir()
    keys = [f"k{i:02d}" for i in range(40)]
    with open(emoji / "concepts-ko.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["hexcode", "name", "keywords"], *[[k, f"이름{k}", ""] for k in keys]])
    with open(emoji / "captions-ko.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "key", "style", "split"])
        for k in keys:
            for style in ("google", "twitter"):
                writer.writerow([f"images/{style}/{k}.png", f"이름{k}|이름{k}, 키워드", k, style, "seen"])
    pairs = korean_pairs(emoji, ["google"], {("k00", "google")}, tmp_path / "out")
    assert pairs.held_out and set(pairs.held_out).isdisjoint(pairs.trained)
    assert sorted(pairs.held_out + pairs.trained) == keys[1:] or sorted(pairs.held_out + pairs.trained) == keys
    rows = list(csv.DictReader(open(pairs.train_csv)))
    assert {r["key"] for r in rows} == set(pairs.trained) - {"k00"} and all("google" in r["image"] for r in rows)
    assert pairs.candidates["k05"] == ["이름k05", "이름k05, 키워드"]
    with pytest.raises(DataError, match="no Korean names"):
        korean_pairs(tmp_path, ["google"], set(), tmp_path / "x")
